"""Attention stages in plain torch: causal prefill over new tokens, paged attention over the cache.

Shapes: T new tokens, R query rows, S sequences, Hq query heads, Hkv KV heads, D head_dim,
N pool blocks, B block_size.

The paged version here is the reference (and the fallback of the attention service); the fast
path is the C++ kernel in services/attention_cpu.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Write new K/V rows at their slots.

    k_pool: [N, Hkv, D, B]; v_pool: [N, Hkv, B, D] (moelens.kv_cache); k, v: [T, Hkv, D];
    slots: [T] int64 (block * B + offset).
    """
    block_size = v_pool.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    k_pool[blocks, :, :, offsets] = k.to(k_pool.dtype)
    v_pool[blocks, :, offsets] = v.to(v_pool.dtype)


def gather_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` cached tokens of one sequence: K and V, [Hkv, length, D] each."""
    num_kv_heads, block_size = v_pool.shape[1], v_pool.shape[2]
    table = block_table[:-(-length // block_size)].long()
    k = k_pool[table].permute(1, 0, 3, 2)  # [Hkv, nb, B, D]
    v = v_pool[table].permute(1, 0, 2, 3)
    return tuple(x.reshape(num_kv_heads, -1, x.shape[-1])[:, :length] for x in (k, v))


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Each query row attends to the first `context_lens[r]` cached tokens of its sequence.

    q: [R, Hq, D]; k_pool [N, Hkv, D, B], v_pool [N, Hkv, B, D]; block_tables: [R, max_blocks]
    int32; context_lens: [R] int32. Returns [R, Hq, D] in q's dtype.
    """
    num_rows, num_heads, _ = q.shape
    group = num_heads // v_pool.shape[1]
    out = torch.empty_like(q)
    for r in range(num_rows):
        k, v = gather_kv(k_pool, v_pool, block_tables[r], int(context_lens[r]))  # [Hkv, L, D]
        k, v = k.to(q.dtype), v.to(q.dtype)
        k = k.repeat_interleave(group, dim=0)  # [Hq, L, D]
        v = v.repeat_interleave(group, dim=0)
        out[r] = F.scaled_dot_product_attention(q[r, :, None], k, v, scale=scale)[:, 0]
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                      scale: float) -> torch.Tensor:
    """Causal attention within each sequence of a packed batch of new tokens (no cached prefix).

    q: [T, Hq, D]; k, v: [T, Hkv, D]; seq_lens sum to T. Returns [T, Hq, D]. Sequences of equal
    length run as one batched call (a step's prompts often share lengths; one call of S
    sequences is ~1.7x faster than S calls on CPU).
    """
    out = torch.empty_like(q)
    starts_by_len: dict[int, list[int]] = {}
    start = 0
    for length in seq_lens:
        starts_by_len.setdefault(length, []).append(start)
        start += length
    for length, starts in starts_by_len.items():
        if len(starts) == 1:
            rows = slice(starts[0], starts[0] + length)
        else:
            rows = (torch.tensor(starts)[:, None] + torch.arange(length)).reshape(-1)  # [S*L]
        out[rows] = _causal(q[rows], k[rows], v[rows], len(starts), length, scale)
    return out


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_seqs: int, length: int,
            scale: float) -> torch.Tensor:
    """S sequences of L tokens each, packed: q [S*L, Hq, D], k/v [S*L, Hkv, D] -> [S*L, Hq, D]."""
    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.view(num_seqs, length, *t.shape[1:]).transpose(1, 2)  # [S, H, L, D]

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v),
                                         is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape)
