"""Paged KV cache: the pool layout, block tables and slot mapping.

Layout (one pool per layer, K and V separate):

    k_pool, v_pool: [num_blocks, num_kv_heads, block_size, head_dim]

A token's *slot* is `block_id * block_size + offset`. Within a block the `block_size` rows of one
KV head are contiguous, so a decode kernel reads each (block, kv head) as one contiguous run of
`block_size * head_dim` elements and uses it for every query head of that GQA group.

Block ownership (which blocks a sequence holds) belongs to the coordinator's block manager; this
module only has the data structure and the pure index arithmetic both sides agree on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVPool:
    """K and V storage for all layers: [num_layers, num_blocks, num_kv_heads, block_size, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                 head_dim: int, dtype: torch.dtype = torch.float32) -> "KVPool":
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        return cls(k=torch.zeros(shape, dtype=dtype), v=torch.zeros(shape, dtype=dtype))

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]


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
    """Ragged block tables -> [num_rows, max_blocks] int32, padded with -1 (never read)."""
    width = max((len(t) for t in tables), default=0)
    out = torch.full((len(tables), max(width, 1)), -1, dtype=torch.int32)
    for row, table in enumerate(tables):
        out[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
    return out
