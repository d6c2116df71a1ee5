"""One forward pass over a packed batch, with attention behind a small interface.

Legend: T new tokens, S sequences, R emitting rows, Hq/Hkv heads, D head_dim, H hidden, V vocab.

Attention is split by where its keys live. A sequence whose new tokens start at position 0 has no
cached prefix: its causal attention runs over the new tokens alone (on the accelerator in the
services). Every other new token (decode, later prefill chunks) attends to the paged cache, after
its own K/V have been stored, so a token at position p reads slots 0..p of its sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moelens.config import ModelConfig
from moelens.kv_cache import KVPool, pad_block_tables
from moelens.model import attention as ref_attention
from moelens.model.stages import (embed, final_logits, post_attention, pre_attention,
                                   rope_tables)
from moelens.model.weights import ModelWeights


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    seq_lens: list[int]  # new tokens per sequence (sum T), sequences packed in order
    block_tables: list[list[int]]  # per sequence, covering every position up to its last new token
    slots: torch.Tensor  # [T] int64 cache slot of each new token
    emit_rows: torch.Tensor  # [R] int64 indices into T of rows whose logits are needed

    @property
    def seq_starts(self) -> list[int]:
        """Position of each sequence's first new token."""
        starts, offset = [], 0
        for length in self.seq_lens:
            starts.append(int(self.positions[offset]) if length else 0)
            offset += length
        return starts


@dataclass
class AttentionSplit:
    """Which new tokens use prefill attention over themselves and which read the paged cache."""

    fresh_rows: torch.Tensor  # [Tf] token indices of sequences starting at position 0
    fresh_seq_lens: list[int]
    paged_rows: torch.Tensor  # [Tp] token indices attending to the cache
    paged_block_tables: torch.Tensor  # [Tp, max_blocks] int32
    paged_context_lens: torch.Tensor  # [Tp] int32 (position + 1)


def split_attention(batch: ForwardBatch) -> AttentionSplit:
    fresh, fresh_lens, paged, tables, ctx = [], [], [], [], []
    offset = 0
    for length, start, table in zip(batch.seq_lens, batch.seq_starts, batch.block_tables):
        rows = list(range(offset, offset + length))
        if start == 0:
            fresh += rows
            fresh_lens.append(length)
        else:
            paged += rows
            tables += [table] * length
            ctx += [start + i + 1 for i in range(length)]
        offset += length
    return AttentionSplit(
        fresh_rows=torch.tensor(fresh, dtype=torch.int64), fresh_seq_lens=fresh_lens,
        paged_rows=torch.tensor(paged, dtype=torch.int64),
        paged_block_tables=pad_block_tables(tables),
        paged_context_lens=torch.tensor(ctx, dtype=torch.int32))


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch, split: AttentionSplit) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> attention output [T, Hq, D]; stores k, v."""


class LocalPagedAttention:
    """Attention in this process over a local KV pool, with the torch reference kernels."""

    def __init__(self, pool: KVPool, scale: float, paged_fn=ref_attention.paged_attention,
                 store_fn=ref_attention.store_kv):
        self.pool, self.scale = pool, scale
        self.paged_fn, self.store_fn = paged_fn, store_fn

    def attend(self, layer, q, k, v, batch, split):
        k_pool, v_pool = self.pool.layer(layer)
        self.store_fn(k_pool, v_pool, k, v, batch.slots)
        out = torch.empty_like(q)
        if split.fresh_seq_lens:
            rows = split.fresh_rows
            out[rows] = ref_attention.prefill_attention(q[rows], k[rows], v[rows],
                                                        split.fresh_seq_lens, self.scale)
        if split.paged_rows.numel():
            rows = split.paged_rows
            out[rows] = self.paged_fn(q[rows].contiguous(), k_pool, v_pool,
                                      split.paged_block_tables, split.paged_context_lens,
                                      self.scale)
        return out


def forward(cfg: ModelConfig, weights: ModelWeights, batch: ForwardBatch,
            backend: AttentionBackend, inv_freq: torch.Tensor) -> torch.Tensor:
    """All layers, then logits of the emitting rows: -> [R, V] fp32."""
    split = split_attention(batch)
    hidden = embed(weights, batch.token_ids)  # [T, H]
    rope = rope_tables(batch.positions, inv_freq, hidden.dtype)
    for layer, lw in enumerate(weights.layers):
        q, k, v = pre_attention(cfg, lw, hidden, rope)
        attn = backend.attend(layer, q, k, v, batch, split)
        hidden = post_attention(cfg, lw, hidden, attn)
    return final_logits(cfg, weights, hidden, batch.emit_rows)
