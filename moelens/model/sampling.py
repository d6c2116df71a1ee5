"""Token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

Legend: R emitting rows, V vocab.

Random draws use the exponential-race form of the Gumbel trick: argmax(p / Exp(1)) is a sample
from p. Each row's noise comes from its own generator seeded by (request seed, step), so a token
does not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelens import panel_gemm
from moelens.sampling import RowSampling

_SEED_STRIDE = 1_000_003  # spreads (seed, step) pairs over generator seeds


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] fp32 log-prob of the chosen token (of the unfiltered softmax)
    top_ids: torch.Tensor  # [R, L] int64, L = max requested logprobs (may be 0)
    top_logprobs: torch.Tensor  # [R, L]


def _filter_row(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask tokens outside top-k / the top-p nucleus of one row. logits: [V] (already scaled)."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token crossing p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _draw(probs: torch.Tensor, seed: int, step: int) -> int:
    gen = torch.Generator(device=probs.device)
    gen.manual_seed((seed * _SEED_STRIDE + step) % (2**63 - 1))
    noise = torch.empty_like(probs).exponential_(generator=gen)
    return int(torch.argmax(probs / noise))


def _argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, V] fp32 -> each row's argmax [R] and logsumexp [R, 1]; one fused pass on CPUs the
    panel kernels run on (4.4 vs 23.5 ms for 256 x 32k logits on the 2-core dev machine)."""
    if logits.device.type == "cpu" and panel_gemm.is_supported():
        chosen, log_norm = panel_gemm.argmax_logsumexp(logits)
    else:
        chosen, log_norm = torch.argmax(logits, dim=-1), torch.logsumexp(logits, dim=-1)
    return chosen, log_norm[:, None]


def sample(logits: torch.Tensor, rows: list[RowSampling]) -> SampleOutput:
    """logits: [R, V] fp32 -> chosen token per row, with log-probabilities."""
    logits = logits.float()
    for r, row in enumerate(rows):
        if row.suppress_token_ids:
            logits[r, list(row.suppress_token_ids)] = float("-inf")
    chosen, log_norm = _argmax_logsumexp(logits)  # greedy default; no [R, V] log-softmax
    for r, row in enumerate(rows):
        p = row.params
        if p.is_greedy:
            continue
        scaled = _filter_row(logits[r] / p.temperature, p.top_k, p.top_p)
        chosen[r] = _draw(torch.softmax(scaled, dim=-1), row.seed, row.step)
    width = max((row.params.logprobs or 0 for row in rows), default=0)
    top = torch.topk(logits, width, dim=-1) if width else None  # same order as the log-probs
    return SampleOutput(
        token_ids=chosen,
        logprobs=(logits.gather(1, chosen[:, None]) - log_norm)[:, 0],
        top_ids=top.indices if top else torch.empty(len(rows), 0, dtype=torch.int64),
        top_logprobs=top.values - log_norm if top else torch.empty(len(rows), 0),
    )
