"""The model as plain stages over tensors, in the order one forward pass runs them.

Legend: T new tokens, H hidden, Hq query heads, Hkv KV heads, D head_dim, V vocab, R rows that
emit a token. A layer is split at attention so the services can run the halves on different
machines: pre_attention -> (attention, anywhere) -> post_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelens import panel_gemm
from moelens.config import QK_NORM_FULL, QK_NORM_PER_HEAD, ModelConfig
from moelens.model.moe import grouped_experts, route, swiglu
from moelens.model.weights import LayerWeights, ModelWeights
from moelens.panel_gemm import linear


_FUSED_NORM_DTYPES = (torch.float32, torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, scaled in the input dtype (as HF does). x: [..., N]; weight: [N].
    On CPUs with the panel kernels, fp32 and bf16 run fused (panel_gemm.rms_norm: same
    roundings, 2-4x faster at a layer's 256-2048 rows, bench/rms_norm.py); elsewhere rms_norm_torch."""
    if x.device.type == "cpu" and x.dtype in _FUSED_NORM_DTYPES and weight.dtype == x.dtype \
            and panel_gemm.is_supported():
        return panel_gemm.rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm in torch ops (any device and dtype; the reference of the fused kernel)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """[D/2] inverse frequencies of the default (non-scaled) rotary embedding."""
    d = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))


@dataclass(frozen=True)
class Rope:
    """The rotary tables of a batch's positions: built once (`rope_tables`), used by every
    layer's q and k."""

    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor  # [T, 1, D/2]: both halves of the rotate-half form use the same sines


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> Rope:
    """cos/sin in fp32, cast to the activations' dtype (as HF does). positions: [T]."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = torch.cat([freqs, freqs], dim=-1).cos()  # [T, D]
    return Rope(cos=cos.to(dtype)[:, None], sin=freqs.sin().to(dtype)[:, None])


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate-half RoPE, (x1·cos − x2·sin, x2·cos + x1·sin) per head, in three ops (~4x the
    mul/cat/mul/add form on CPU). x: [T, heads, D] -> [T, heads, D]."""
    half = x.shape[-1] // 2
    out = x * rope.cos
    out[..., :half].addcmul_(x[..., half:], rope.sin, value=-1)
    out[..., half:].addcmul_(x[..., :half], rope.sin)
    return out


def embed(weights: ModelWeights, token_ids: torch.Tensor) -> torch.Tensor:
    """token_ids: [T] -> hidden [T, H]."""
    return F.embedding(token_ids, weights.embed)


def _qk_norm(cfg: ModelConfig, lw: LayerWeights, q: torch.Tensor,
             k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Q]; k: [T, KV]. Qwen3 normalises each head, OLMoE the whole projection."""
    if cfg.qk_norm == QK_NORM_FULL:
        return rms_norm(q, lw.q_norm, cfg.rms_norm_eps), rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
    if cfg.qk_norm == QK_NORM_PER_HEAD:
        t, d = q.shape[0], cfg.head_dim
        q = rms_norm(q.view(t, -1, d), lw.q_norm, cfg.rms_norm_eps).view(t, -1)
        k = rms_norm(k.view(t, -1, d), lw.k_norm, cfg.rms_norm_eps).view(t, -1)
    return q, k


def pre_attention(cfg: ModelConfig, lw: LayerWeights, hidden: torch.Tensor,
                  rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, fused QKV, q/k norms, clip, RoPE. hidden: [T, H] -> q [T,Hq,D], k/v [T,Hkv,D]."""
    x = rms_norm(hidden, lw.input_norm, cfg.rms_norm_eps)
    qkv = linear(x, lw.qkv_proj, lw.qkv_bias)  # [T, Q + 2KV]
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q, k = _qk_norm(cfg, lw, q, k)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    t, d = hidden.shape[0], cfg.head_dim
    q = apply_rope(q.reshape(t, cfg.num_heads, d), rope)
    k = apply_rope(k.reshape(t, cfg.num_kv_heads, d), rope)
    return q, k, v.reshape(t, cfg.num_kv_heads, d)


def mlp(cfg: ModelConfig, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """The layer's MLP on normed input x: [T, H] -> [T, H]."""
    if lw.dense_gate_up is not None:
        return swiglu(x, lw.dense_gate_up, lw.dense_down)
    routing = route(x, lw.router, cfg.top_k, cfg.renormalize_topk)
    out = grouped_experts(x, routing, lw.experts_gate_up, lw.experts_down)
    if lw.shared_gate_up is not None:
        gate = torch.sigmoid(F.linear(x, lw.shared_expert_gate))  # [T, 1]
        out = out + gate * swiglu(x, lw.shared_gate_up, lw.shared_down)
    return out


def post_attention(cfg: ModelConfig, lw: LayerWeights, hidden: torch.Tensor,
                   attn_out: torch.Tensor) -> torch.Tensor:
    """o_proj + residual, norm, MLP + residual. hidden: [T, H]; attn_out: [T, Hq, D] -> [T, H]."""
    hidden = hidden + linear(attn_out.reshape(hidden.shape[0], -1), lw.o_proj)
    return hidden + mlp(cfg, lw, rms_norm(hidden, lw.post_attention_norm, cfg.rms_norm_eps))


def final_logits(cfg: ModelConfig, weights: ModelWeights, hidden: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
    """Final norm and lm_head only on the rows that emit a token. hidden: [T, H]; rows: [R]
    -> logits [R, V] in fp32."""
    x = rms_norm(hidden.index_select(0, rows), weights.final_norm, cfg.rms_norm_eps)
    return linear(x, weights.lm_head, fp32_out=True)
