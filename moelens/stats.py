"""Stats objects the engines return; exporters (not the engines) turn them into metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepTimings:
    """Seconds one step spent per phase, as measured by the expert service (mirrors the proto)."""

    total_s: float = 0.0
    gemm_s: float = 0.0
    attention_s: float = 0.0
    weight_wait_s: float = 0.0
    exchange_s: float = 0.0
    prefill_attention_s: float = 0.0
    sample_s: float = 0.0
    overlap_s: float = 0.0
    weight_bytes_streamed: int = 0


@dataclass
class StepStats:
    """One scheduler iteration, as the coordinator saw it."""

    step_id: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    wall_s: float
    """Coordinator-side time of the Step RPC."""
    timings: StepTimings
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_total_blocks: int
    num_preempted: int
    """Sequences preempted while scheduling this step."""
    token_budget: int

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def kv_usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks if self.num_total_blocks else 0.0


@dataclass
class RequestStats:
    """A finished request's life."""

    finish_reason: str
    """"stop", "length" or "abort"."""
    num_prompt_tokens: int
    num_generation_tokens: int
    queue_s: float
    """Arrival to first scheduled."""
    ttft_s: float
    """Arrival to first generated token (0 when none was generated)."""
    e2e_s: float
    inter_token_s: list[float] = field(default_factory=list)
    num_preemptions: int = 0


@dataclass
class PredictionStats:
    """The performance model beside what was measured, refreshed periodically."""

    predicted_tokens_per_s: float
    measured_tokens_per_s: float
    bottleneck: str
    """One of: io, gemm, cpu_attention, kv_capacity, host_memory_bandwidth."""
