"""The expert service's Prometheus exporter: its own view of each step, its layout and profile.

The coordinator exports the same step timings (relayed in the Step reply) per iteration; these
series are the expert service's side, named `moelens_expert_*` so a query over both jobs never
counts a step twice. Layout and profile gauges explain the coordinator's prediction: how many
layers stream per step, and the measured bandwidth and GEMM line the performance model uses.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moelens.stats import StepTimings

PHASES = ("gemm", "attention", "weight_wait", "exchange", "prefill_attention", "sample")
"""StepTimings fields (without `_s`) reported under moelens_expert_phase_seconds_total{phase}."""

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 10.0, 20.0, 40.0, 80.0)


class ExpertMetrics:
    """All expert_gpu series, registered on `registry` (never the global default one)."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.step_duration = Histogram(
            "moelens_expert_step_seconds", "Seconds the expert service spent on one step.",
            buckets=STEP_BUCKETS, registry=r)
        self.phase_seconds = Counter(
            "moelens_expert_phase_seconds", "Seconds spent per phase of the steps.",
            ["phase"], registry=r)
        for phase in PHASES:
            self.phase_seconds.labels(phase)
        self.overlap_seconds = Counter(
            "moelens_expert_pipeline_overlap_seconds",
            "Seconds GEMMs of one token group overlapped CPU attention of the other.", registry=r)
        self.tokens = Counter(
            "moelens_expert_tokens", "Tokens run through all layers.", registry=r)
        self.weight_bytes_streamed = Counter(
            "moelens_expert_weight_bytes_streamed",
            "Bytes of weights copied host-to-device for non-resident layers.", registry=r)
        self._register_layout(r)
        self._register_profile(r)

    def _register_layout(self, r: CollectorRegistry) -> None:
        self.resident_layers = Gauge(
            "moelens_expert_resident_layers",
            "Decoder layers whose weights stay on the accelerator.", registry=r)
        self.streamed_layers = Gauge(
            "moelens_expert_streamed_layers",
            "Decoder layers streamed from host memory every step.", registry=r)
        self.device_memory_budget = Gauge(
            "moelens_expert_device_memory_budget_bytes",
            "Accelerator memory the service may use for weights and buffers.", registry=r)
        self.weight_bytes = Gauge(
            "moelens_expert_weight_bytes", "Bytes of all model weights (held in host memory).",
            registry=r)

    def _register_profile(self, r: CollectorRegistry) -> None:
        self.h2d_bytes_per_s = Gauge(
            "moelens_expert_profile_h2d_bytes_per_second",
            "Measured host-to-device copy bandwidth (pinned memory).", registry=r)
        self.gemm_slope = Gauge(
            "moelens_expert_profile_gemm_slope_seconds",
            "Measured GEMM time of one decoder layer per extra token.", registry=r)
        self.gemm_intercept = Gauge(
            "moelens_expert_profile_gemm_intercept_seconds",
            "Measured fixed GEMM time of one decoder layer (0 tokens extrapolated).", registry=r)

    def observe_step(self, timings: StepTimings, num_tokens: int) -> None:
        self.step_duration.observe(timings.total_s)
        for phase in PHASES:
            self.phase_seconds.labels(phase).inc(getattr(timings, f"{phase}_s"))
        self.overlap_seconds.inc(timings.overlap_s)
        self.tokens.inc(num_tokens)
        self.weight_bytes_streamed.inc(timings.weight_bytes_streamed)

    def set_layout(self, num_resident_layers: int, num_streamed_layers: int,
                   device_memory_budget_bytes: int, weight_bytes_total: int) -> None:
        self.resident_layers.set(num_resident_layers)
        self.streamed_layers.set(num_streamed_layers)
        self.device_memory_budget.set(device_memory_budget_bytes)
        self.weight_bytes.set(weight_bytes_total)

    def set_profile(self, h2d_bytes_per_s: float, gemm_slope_s: float,
                    gemm_intercept_s: float) -> None:
        self.h2d_bytes_per_s.set(h2d_bytes_per_s)
        self.gemm_slope.set(gemm_slope_s)
        self.gemm_intercept.set(gemm_intercept_s)
