"""The attention service's engine on activations in the expert's compute dtype: bf16 q, k, v
give the fp32 run's output rounded to bf16; mixed or non-float dtypes are refused by name."""

from __future__ import annotations

import pytest
import torch

from moelens.checkpoint import load_weights
from moelens.errors import InvalidArgument
from services.attention_cpu.config import AttentionConfig
from services.attention_cpu.engine import AttentionEngine


@pytest.fixture
def engine(tiny_checkpoints):
    cfg, _ = load_weights(tiny_checkpoints["mixtral"])
    engine = AttentionEngine(cfg, AttentionConfig(kv_cache_gb=0.01, kv_dtype="bfloat16"))
    return engine, cfg


def _layer(engine, cfg, dtype, gen):
    """A 5-token prompt stored at slots 0..4, then one decode row reading it (context 6)."""
    plan = engine.begin(list(range(5)), {7: [0]}, [], [])
    k = torch.randn(5, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    engine.run_layer(plan, 0, k.to(dtype), k.to(dtype), torch.empty(0, cfg.num_heads,
                                                                     cfg.head_dim, dtype=dtype))
    decode = engine.begin([5], {7: [0]}, [0], [6])
    k1 = torch.randn(1, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    q = torch.randn(1, cfg.num_heads, cfg.head_dim, generator=gen)
    return engine.run_layer(decode, 0, k1.to(dtype), k1.to(dtype), q.to(dtype)).out


def test_bf16_activations_come_back_in_bf16(engine):
    engine, cfg = engine
    fp32 = _layer(engine, cfg, torch.float32, torch.Generator().manual_seed(0))
    engine.free([7])
    bf16 = _layer(engine, cfg, torch.bfloat16, torch.Generator().manual_seed(0))
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    # the pool is bf16 either way; only q's rounding to bf16 and o's differ
    torch.testing.assert_close(bf16.float(), fp32, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16, torch.float32),
                                    (torch.int32, torch.int32, torch.int32)])
def test_mixed_or_integer_activations_are_refused(engine, dtypes):
    engine, cfg = engine
    plan = engine.begin([0], {7: [0]}, [0], [1])
    q_dtype, k_dtype, v_dtype = dtypes
    k = torch.zeros(1, cfg.num_kv_heads, cfg.head_dim)
    with pytest.raises(InvalidArgument, match="must share one dtype"):
        engine.run_layer(plan, 0, k.to(k_dtype), k.to(v_dtype),
                         torch.zeros(1, cfg.num_heads, cfg.head_dim).to(q_dtype))
