"""The attention engine: the KV pool, what each step's plan says, and attention per layer.

Legend: T new tokens, R query rows reading the cache, Hq/Hkv heads, D head_dim.

The coordinator owns block allocation; this engine stores K/V where it is told and records which
blocks live sequences hold, only to report usage and to release them on FreeSequences.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from moelens.config import ModelConfig
from moelens.errors import InvalidArgument, NotFound
from moelens.kv_cache import KVPool, num_blocks_for_bytes, pad_block_tables
from services.attention_cpu.config import AttentionConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIRE_DTYPES = frozenset(_DTYPES.values())
"""Dtypes q, k and v may arrive in (one for all three)."""


@dataclass
class StepPlan:
    """One (step, group)'s plan in tensor form, built once and used by every layer."""

    slots: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [R, max_blocks] int32
    context_lens: torch.Tensor  # [R] int32
    kv_tokens: int
    """Σ context_lens: the cached tokens each layer reads (counted once per step, not per
    layer)."""

    @property
    def num_rows(self) -> int:
        return self.context_lens.numel()


@dataclass
class LayerResult:
    out: torch.Tensor  # [R, Hq, D]
    seconds: float


def _load_kernel():
    from services.attention_cpu import kernel
    return kernel


class AttentionEngine:
    def __init__(self, model: ModelConfig, config: AttentionConfig):
        self.model, self.config = model, config
        dtype = _DTYPES[config.kv_dtype]
        num_blocks = num_blocks_for_bytes(int(config.kv_cache_gb * 2**30), model.num_layers,
                                          model.num_kv_heads, config.block_size, model.head_dim,
                                          dtype.itemsize)
        if num_blocks < 1:
            raise ValueError(f"--kv-cache-gb {config.kv_cache_gb} holds no block of "
                             f"{config.block_size} tokens; raise it")
        self.pool = KVPool.allocate(model.num_layers, num_blocks, model.num_kv_heads,
                                    config.block_size, model.head_dim, dtype)
        self.kernel = _load_kernel()
        self.kernel.backend()  # compiles the extension on first use: before serving, not in an RPC
        self.kernel.set_num_threads(config.num_threads)
        self.scale = model.head_dim ** -0.5
        self.seq_to_blocks: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self.kv_read_bytes_per_s = 0.0
        self.host_read_bytes_per_s = 0.0

    # Capacity ---------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_used_blocks(self) -> int:
        with self._lock:
            return sum(len(b) for b in self.seq_to_blocks.values())

    @property
    def pool_bytes(self) -> int:
        return 2 * self.pool.k.numel() * self.pool.k.element_size()

    def free(self, seq_ids: list[int]) -> int:
        with self._lock:
            return sum(len(self.seq_to_blocks.pop(s, [])) for s in seq_ids)

    # Steps ------------------------------------------------------------------------------------
    def begin(self, slots: list[int], sequences: dict[int, list[int]], row_sequence: list[int],
              row_context_len: list[int]) -> StepPlan:
        """Validate a plan against the pool and record the sequences' block tables."""
        limit = self.num_blocks * self.config.block_size
        if slots and not 0 <= min(slots) <= max(slots) < limit:
            raise InvalidArgument(f"plan.slots out of range [0, {limit})")
        for seq_id, blocks in sequences.items():
            if blocks and not 0 <= min(blocks) <= max(blocks) < self.num_blocks:
                raise InvalidArgument(f"plan.sequences[{seq_id}].block_ids out of range "
                                      f"[0, {self.num_blocks})")
        seq_ids = list(sequences)
        if any(not 0 <= i < len(seq_ids) for i in row_sequence):
            raise InvalidArgument("plan.row_sequence indexes past plan.sequences")
        with self._lock:
            self.seq_to_blocks.update(sequences)
        # one padded table per sequence, then a row per query: a prompt chunk that continues a
        # cached prefix has a row per token, all with its sequence's table
        tables = pad_block_tables(list(sequences.values()))  # [S, max_blocks]
        rows = torch.tensor(row_sequence, dtype=torch.int64)  # [R]
        return StepPlan(slots=torch.tensor(slots, dtype=torch.int64), block_tables=tables[rows],
                        context_lens=torch.tensor(row_context_len, dtype=torch.int32),
                        kv_tokens=sum(row_context_len))

    def run_layer(self, plan: StepPlan, layer: int, k: torch.Tensor, v: torch.Tensor,
                  q: torch.Tensor) -> LayerResult:
        """Store the new K/V, then attention of the cache-reading rows.

        k, v: [T, Hkv, D]; q: [R, Hq, D], all in one of WIRE_DTYPES (the expert's compute
        dtype) -> out [R, Hq, D] in q's dtype (the kernel itself runs on fp32 q and o).
        """
        if not 0 <= layer < self.model.num_layers:
            raise InvalidArgument(f"layer {layer} out of range [0, {self.model.num_layers})")
        if q.dtype not in WIRE_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
            raise InvalidArgument(f"layer {layer}: q, k and v must share one dtype of "
                                  f"{sorted(str(d) for d in WIRE_DTYPES)}, got {q.dtype}, "
                                  f"{k.dtype}, {v.dtype}")
        if k.shape[0] != plan.slots.numel() or q.shape[0] != plan.num_rows:
            raise InvalidArgument(f"layer {layer}: {k.shape[0]} K rows for {plan.slots.numel()} "
                                  f"slots, {q.shape[0]} queries for {plan.num_rows} rows")
        start = time.perf_counter()
        k_pool, v_pool = self.pool.layer(layer)
        if k.shape[0]:
            self.kernel.store_kv(k_pool, v_pool, k, v, plan.slots)
        if plan.num_rows:
            out = self.kernel.paged_attention(q.float(), k_pool, v_pool, plan.block_tables,
                                              plan.context_lens, self.scale).to(q.dtype)
        else:
            out = q.new_empty(q.shape)
        return LayerResult(out=out, seconds=time.perf_counter() - start)

    def kv_bytes_read(self, plan: StepPlan) -> int:
        per_token = 2 * self.model.kv_size * self.pool.k.element_size()
        return plan.kv_tokens * per_token

    def require_sequence(self, seq_id: int) -> list[int]:
        with self._lock:
            if seq_id not in self.seq_to_blocks:
                raise NotFound(f"sequence {seq_id} holds no blocks")
            return self.seq_to_blocks[seq_id]
