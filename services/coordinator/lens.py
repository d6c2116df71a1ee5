"""The performance model, live: the hardware profile from the running services, the token
budget the scheduler uses, and a periodically refreshed prediction for the current load."""

from __future__ import annotations

import time
from dataclasses import dataclass

from moelens.config import ModelConfig
from moelens.profile import HardwareProfile
from moelens.profiler import layer_flops_per_token, layer_weight_bytes
from services.coordinator.perf_model import (Deployment, ModelSpec, Workload, predict,
                                             token_budget)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
REFRESH_S = 5.0


def profile_from_services(cfg: ModelConfig, expert_info, attention_info) -> HardwareProfile:
    """Assemble a HardwareProfile from what the expert and attention services measured at
    warmup (nothing is guessed: a service that did not warm up makes this raise)."""
    weight_bytes = _DTYPE_BYTES[expert_info.dtype]
    return HardwareProfile(
        io_bandwidth_bytes_per_s=expert_info.h2d_bytes_per_s,
        gemm_intercept_s=expert_info.layer_gemm.intercept_s,
        gemm_slope_s_per_token=expert_info.layer_gemm.slope_s,
        gemm_curve_tokens=tuple(p.tokens for p in expert_info.layer_gemm_curve),
        gemm_curve_s=tuple(p.seconds for p in expert_info.layer_gemm_curve),
        attention_kv_bytes_per_s=attention_info.kv_read_bytes_per_s,
        host_memory_bandwidth_bytes_per_s=attention_info.host_read_bytes_per_s,
        exchange_fixed_s=expert_info.exchange_fixed_s,
        exchange_s_per_byte=expert_info.exchange_s_per_byte,
        is_accelerator_separate=expert_info.device != "cpu",
        gemm_layer_flops_per_token=layer_flops_per_token(cfg),
        gemm_layer_weight_bytes=float(layer_weight_bytes(cfg, weight_bytes)),
        device=f"{expert_info.device} (expert service)", dtype=expert_info.dtype)


@dataclass
class LiveLens:
    spec: ModelSpec
    profile: HardwareProfile
    deployment: Deployment
    predicted_tokens_per_s: float = 0.0
    bottleneck: str = ""
    _refreshed_s: float = 0.0

    @classmethod
    def build(cls, cfg: ModelConfig, profile: HardwareProfile, expert_info,
              attention_info) -> "LiveLens":
        kv_bytes = _DTYPE_BYTES[attention_info.kv_dtype]
        spec = ModelSpec.from_config(cfg, weight_bytes=_DTYPE_BYTES[expert_info.dtype],
                                     kv_bytes=kv_bytes)  # activations cross in that dtype too
        budget = expert_info.device_memory_budget_bytes or None
        deployment = Deployment(kv_cache_bytes=attention_info.pool_bytes,
                                block_size=attention_info.block_size,
                                device_memory_bytes=budget,
                                max_num_tokens=expert_info.max_num_tokens or 8192)
        return cls(spec, profile, deployment)

    def token_budget(self) -> int:
        return token_budget(self.spec, self.profile, self.deployment)

    def refresh(self, pairs: list[tuple[int, int]]) -> None:
        """Re-predict for the (prompt_len, gen_len) mix of the live requests, at most every
        REFRESH_S seconds (the prediction is cheap, but not free)."""
        now = time.monotonic()
        if not pairs or now - self._refreshed_s < REFRESH_S:
            return
        self._refreshed_s = now
        try:
            prediction = predict(self.spec, self.profile, Workload.from_pairs(pairs),
                                 self.deployment)
        except ValueError:
            return  # e.g. a request longer than the cache: the scheduler rejects those anyway
        self.predicted_tokens_per_s = prediction.stage2.total_tokens_per_s
        self.bottleneck = prediction.bottleneck
