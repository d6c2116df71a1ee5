"""Warmup: run the kernel over the whole pool once and measure its KV read throughput."""

from __future__ import annotations

import time

import torch

from services.attention_cpu.engine import AttentionEngine


def measure_kv_bandwidth(engine: AttentionEngine, context_len: int = 2048) -> float:
    """KV bytes/s of decode attention over `context_len`-token sequences filling the pool
    (capped at 64 sequences); pages of the pool are touched for real, not just allocated."""
    model, block_size = engine.model, engine.config.block_size
    blocks_per_seq = -(-context_len // block_size)
    num_seqs = max(1, min(64, engine.num_blocks // blocks_per_seq))
    context_len = min(context_len, engine.num_blocks * block_size // num_seqs)
    blocks_per_seq = -(-context_len // block_size)
    tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, -1)
    lens = torch.full((num_seqs,), context_len, dtype=torch.int32)
    q = torch.randn(num_seqs, model.num_heads, model.head_dim)
    k_pool, v_pool = engine.pool.layer(0)
    engine.kernel.paged_attention(q, k_pool, v_pool, tables, lens, engine.scale)  # warm
    start = time.perf_counter()
    engine.kernel.paged_attention(q, k_pool, v_pool, tables, lens, engine.scale)
    seconds = time.perf_counter() - start
    per_token = 2 * model.kv_size * engine.pool.k.element_size()
    return num_seqs * context_len * per_token / max(seconds, 1e-9)
