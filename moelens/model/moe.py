"""Router and expert MLPs: grouped GEMMs over token rows sorted by expert.

Legend: T tokens, H hidden, E experts, K top-k, I expert intermediate.

Why grouped: a per-token loop (or a per-token gather of expert weights) multiplies tiny matrices;
sorting the T*K (token, expert) pairs by expert turns the layer into at most E GEMMs of
[rows_e, H] x [H, 2I] with rows_e ~ T*K/E, which is where CPU and GPU GEMMs are efficient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelens import panel_gemm
from moelens.panel_gemm import PanelWeight, linear


@dataclass
class Routing:
    weights: torch.Tensor  # [T, K] combine weights
    experts: torch.Tensor  # [T, K] int64 expert ids


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool) -> Routing:
    """Softmax over all experts in fp32, keep the top-k, optionally renormalise (HF semantics)."""
    logits = F.linear(x, router)  # [T, E]
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_e = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return Routing(weights=top_w.to(x.dtype), experts=top_e)


Weight = torch.Tensor | PanelWeight  # plain, or packed for the CPU device's panel GEMM


def swiglu(x: torch.Tensor, gate_up: Weight, down: Weight) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)). x: [T, H]; gate_up: [2I, H]; down: [H, I] -> [T, H]."""
    return linear(panel_gemm.swiglu(x, gate_up), down)  # [T, I] -> [T, H]


@dataclass
class ExpertPairs:
    """The T*K (token, expert) pairs of a routing, sorted by expert (stable)."""

    token: torch.Tensor  # [T*K] token of each pair
    weight: torch.Tensor  # [T*K] its combine weight
    counts: torch.Tensor  # [E] pairs per expert


def group_by_expert(routing: Routing, num_experts: int) -> ExpertPairs:
    flat_experts = routing.experts.reshape(-1)  # [T*K]
    order = torch.argsort(flat_experts, stable=True)  # pairs grouped by expert
    return ExpertPairs(token=order // routing.experts.shape[1],
                       weight=routing.weights.reshape(-1)[order].contiguous(),
                       counts=torch.bincount(flat_experts, minlength=num_experts))


def grouped_experts(x: torch.Tensor, routing: Routing, gate_up: Weight,
                    down: Weight) -> torch.Tensor:
    """Sum over each token's top-k experts of weight * expert(x), one GEMM per active expert.

    x: [T, H]; gate_up: [E, 2I, H]; down: [E, H, I] -> [T, H]. With panel weights the whole
    layer is one fused call (panel_gemm.grouped_swiglu); the path below is the same math, one
    expert at a time (for a bf16 down weight whose K the AMX kernel cannot take, say).
    """
    pairs = group_by_expert(routing, gate_up.shape[0])
    token_of_pair = pairs.token
    if isinstance(gate_up, PanelWeight) and isinstance(down, PanelWeight):
        return panel_gemm.grouped_swiglu(x, token_of_pair, pairs.weight, pairs.counts, gate_up,
                                         down)
    counts = pairs.counts.tolist()
    rows = x.index_select(0, token_of_pair)  # [T*K, H] sorted by expert
    out_rows = torch.empty_like(rows)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            end = start + count
            out_rows[start:end] = swiglu(rows[start:end], gate_up[expert], down[expert])
            start = end
    out_rows *= pairs.weight[:, None]
    out = torch.zeros_like(x)
    out.index_add_(0, token_of_pair, out_rows)
    return out


def loop_experts_reference(x: torch.Tensor, routing: Routing, gate_up: torch.Tensor,
                           down: torch.Tensor) -> torch.Tensor:
    """Slow per-token, per-choice loop: the ground truth for grouped_experts in tests."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(routing.experts.shape[1]):
            e = int(routing.experts[t, j])
            out[t] += routing.weights[t, j] * swiglu(x[t:t + 1], gate_up[e], down[e])[0]
    return out


def gather_experts_per_token(x: torch.Tensor, routing: Routing, gate_up: torch.Tensor,
                             down: torch.Tensor) -> torch.Tensor:
    """Per-token gather of expert weights (bmm over [T*K] weight copies): the baseline the
    grouped path is benchmarked against."""
    num_tokens, top_k = routing.experts.shape
    flat = routing.experts.reshape(-1)  # [T*K]
    xs = x.repeat_interleave(top_k, dim=0)[:, None, :]  # [T*K, 1, H]
    gate, up = torch.bmm(xs, gate_up[flat].transpose(1, 2)).chunk(2, dim=-1)  # [T*K, 1, I]
    y = torch.bmm(F.silu(gate) * up, down[flat].transpose(1, 2))[:, 0]  # [T*K, H]
    y = y * routing.weights.reshape(-1, 1)
    return y.view(num_tokens, top_k, -1).sum(dim=1)
