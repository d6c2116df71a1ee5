"""A model spec and hardware profile shared by the performance-model tests."""

from __future__ import annotations

from moelens.config import parse_config
from moelens.profile import HardwareProfile
from services.coordinator.perf_model import ModelSpec


def default_spec_and_profile(**overrides) -> tuple[ModelSpec, HardwareProfile]:
    """A small Mixtral-like ModelSpec and a CPU-only HardwareProfile matched to it."""
    cfg = parse_config(dict(model_type="mixtral", vocab_size=1024, hidden_size=256,
                            intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                            rope_theta=1e6, max_position_embeddings=4096))
    spec = ModelSpec.from_config(cfg, weight_bytes=4, activation_bytes=4)
    fields = dict(io_bandwidth_bytes_per_s=2e9, gemm_intercept_s=8e-3,
                  gemm_slope_s_per_token=5e-5, attention_kv_bytes_per_s=5e9,
                  host_memory_bandwidth_bytes_per_s=9e9, exchange_fixed_s=1e-3,
                  exchange_s_per_byte=1e-9, is_accelerator_separate=False,
                  gemm_layer_flops_per_token=spec.layer_flops_per_token[0],
                  gemm_layer_weight_bytes=float(spec.layer_weight_bytes(0)))
    fields.update(overrides)
    return spec, HardwareProfile(**fields)
