"""Paged KV cache: the pool layout, block tables and slot mapping.

Layout (one pool per layer, K and V separate):

    k_pool: [num_blocks, num_kv_heads, head_dim, block_size]   (K transposed within a block)
    v_pool: [num_blocks, num_kv_heads, block_size, head_dim]

A token's *slot* is `block_id * block_size + offset`. Each (block, kv head) is one contiguous run
of `block_size * head_dim` elements, read once by a decode kernel for every query head of that
GQA group. K is stored transposed so that the run's tokens are contiguous along each head-dim
row: a vector of scores of one head (one token per lane) is then a sum of K rows times
broadcast q elements, with no horizontal sums (services/attention_cpu/csrc).

Block ownership (which blocks a sequence holds) belongs to the coordinator's block manager; this
module only has the data structure and the pure index arithmetic both sides agree on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class KVPool:
    """K and V storage for all layers: k [num_layers, num_blocks, num_kv_heads, head_dim,
    block_size], v [num_layers, num_blocks, num_kv_heads, block_size, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                 head_dim: int, dtype: torch.dtype = torch.float32) -> "KVPool":
        k_shape, v_shape = pool_shapes(num_blocks, num_kv_heads, block_size, head_dim)
        return cls(k=torch.zeros((num_layers, *k_shape), dtype=dtype),
                   v=torch.zeros((num_layers, *v_shape), dtype=dtype))

    @property
    def num_blocks(self) -> int:
        return self.v.shape[1]

    @property
    def block_size(self) -> int:
        return self.v.shape[3]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]


def pool_shapes(num_blocks: int, num_kv_heads: int, block_size: int,
                head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One layer's (k_pool, v_pool) shapes: [N, Hkv, D, B] and [N, Hkv, B, D]."""
    return ((num_blocks, num_kv_heads, head_dim, block_size),
            (num_blocks, num_kv_heads, block_size, head_dim))


def num_blocks_for_bytes(num_bytes: int, num_layers: int, num_kv_heads: int, block_size: int,
                         head_dim: int, dtype_bytes: int) -> int:
    """How many blocks fit in `num_bytes` of host memory (K and V, all layers)."""
    per_block = 2 * num_layers * num_kv_heads * block_size * head_dim * dtype_bytes
    return num_bytes // per_block


def slots_for_positions(block_table: list[int], positions, block_size: int) -> list[int]:
    """Slots where the tokens at `positions` of a sequence live, given its block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def pad_block_tables(tables: list[list[int]]) -> torch.Tensor:
    """Ragged block tables -> [num_rows, max_blocks] int32, padded with -1 (never read).

    One numpy fill, not a tensor per row: the attention service builds this for every step's
    sequences (24 of them took ~0.17 ms row by row, on a 2-5 ms step)."""
    lens = np.fromiter(map(len, tables), np.int64, len(tables))  # [S]
    width = int(lens.max(initial=0))
    out = np.full((len(tables), max(width, 1)), -1, dtype=np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(tables), np.int32, int(lens.sum()))
    out[np.arange(max(width, 1)) < lens[:, None]] = flat  # row-major: each row's ids in order
    return torch.from_numpy(out)
