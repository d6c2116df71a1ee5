"""KV block accounting, in exactly one place: can_allocate / allocate / free.

The pool itself lives in the attention service, which reports its capacity at start; this
manager decides which block ids each sequence holds, and nobody else does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from moelens.kv_cache import blocks_needed


@dataclass(frozen=True)
class Allocation:
    new_block_ids: list[int]
    block_table: list[int]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool has {num_blocks} blocks; raise --kv-cache-gb")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _num_new_blocks(self, seq_id: int, num_tokens: int) -> int:
        return max(0, blocks_needed(num_tokens, self.block_size) - len(self.tables.get(seq_id, [])))

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Can the sequence grow to hold `num_tokens` tokens in total?"""
        return self._num_new_blocks(seq_id, num_tokens) <= len(self._free)

    def allocate(self, seq_id: int, num_tokens: int) -> Allocation:
        needed = self._num_new_blocks(seq_id, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"allocate({seq_id}, {num_tokens}) without can_allocate")
        new = [self._free.popleft() for _ in range(needed)]
        table = self.tables.setdefault(seq_id, [])
        table.extend(new)
        return Allocation(new_block_ids=new, block_table=table)

    def free(self, seq_id: int) -> int:
        blocks = self.tables.pop(seq_id, [])
        self._free.extend(blocks)
        return len(blocks)
