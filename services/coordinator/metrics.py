"""The coordinator's Prometheus exporter: turns StepStats / RequestStats / PredictionStats into series.

Series that vLLM also exports keep vLLM's meaning and histogram buckets under a `moelens_`
prefix (`vllm:num_requests_running` -> `moelens_num_requests_running`, ...), so dashboards and
alerts written for vLLM carry over by renaming. The rest is what only MoE-Lens knows: where each
iteration's time went, how many weight bytes were streamed, and the performance model's
prediction and bottleneck next to the measurement.

The engine never calls prometheus_client: it hands its stats objects to the methods here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moelens.stats import PredictionStats, RequestStats, StepStats

FINISH_REASONS = ("stop", "length", "abort")
"""Pre-created label values of moelens_request_success_total, so each reads 0 before its first."""

BOTTLENECK_RESOURCES = ("io", "gemm", "cpu_attention", "kv_capacity", "host_memory_bandwidth")
"""The resources the performance model can name as the bound (PredictionStats.bottleneck)."""

STEP_PHASES = ("gemm", "attention", "weight_wait", "exchange", "prefill_attention", "sample")
"""StepTimings fields (without `_s`) reported under moelens_step_phase_seconds{phase}."""

# vLLM's buckets (vllm/v1/metrics/loggers.py), kept identical so percentiles compare.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 10.0, 20.0, 40.0, 80.0)
"""Seconds of one iteration or one phase of it: ms on a GPU, seconds for a large batch on CPU."""


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class CoordinatorMetrics:
    """All coordinator series, registered on `registry` (never the global default one).

    `max_model_len` only sets the top bucket of the per-request token-count histograms.
    """

    def __init__(self, registry: CollectorRegistry, max_model_len: int = 32768):
        if max_model_len < 1:
            raise ValueError(f"max_model_len {max_model_len}: pass the model's context length")
        self._register_scheduler(registry)
        self._register_requests(registry, max_model_len)
        self._register_moelens(registry)

    def _register_scheduler(self, registry: CollectorRegistry) -> None:
        """vLLM's scheduler-state gauges and token counters."""
        r = registry
        self.num_requests_running = Gauge(
            "moelens_num_requests_running", "Number of requests in model execution batches.",
            registry=r)
        self.num_requests_waiting = Gauge(
            "moelens_num_requests_waiting", "Number of requests waiting to be processed.",
            registry=r)
        self.kv_cache_usage = Gauge(
            "moelens_kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
            registry=r)
        self.prompt_tokens = Counter(
            "moelens_prompt_tokens", "Number of prefill tokens processed (recomputation after "
            "preemption included).", registry=r)
        self.generation_tokens = Counter(
            "moelens_generation_tokens", "Number of decode tokens processed.", registry=r)
        self.num_preemptions = Counter(
            "moelens_num_preemptions", "Cumulative number of preemptions from the scheduler.",
            registry=r)
        self.request_success = Counter(
            "moelens_request_success", "Count of finished requests by finish reason.",
            ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.request_success.labels(reason)

    def _register_requests(self, registry: CollectorRegistry, max_model_len: int) -> None:
        """vLLM's per-request and per-iteration histograms, with vLLM's buckets."""
        r = registry
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(
            "moelens_request_prompt_tokens", "Number of prefill tokens per finished request.",
            buckets=token_buckets, registry=r)
        self.request_generation_tokens = Histogram(
            "moelens_request_generation_tokens",
            "Number of generated tokens per finished request.", buckets=token_buckets,
            registry=r)
        self.iteration_tokens = Histogram(
            "moelens_iteration_tokens_total", "Histogram of number of tokens per engine step.",
            buckets=ITERATION_TOKENS_BUCKETS, registry=r)
        self.ttft = Histogram(
            "moelens_time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram(
            "moelens_inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            buckets=TPOT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "moelens_request_time_per_output_token_seconds",
            "Histogram of a request's mean time per output token after the first, in seconds.",
            buckets=TPOT_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "moelens_e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "moelens_request_queue_time_seconds",
            "Histogram of time spent waiting before first scheduled, in seconds.",
            buckets=REQUEST_LATENCY_BUCKETS, registry=r)

    def _register_moelens(self, registry: CollectorRegistry) -> None:
        """What only MoE-Lens knows: the time split, weight streaming, the model's prediction."""
        r = registry
        self.rejected = Counter(
            "moelens_request_rejected", "Requests refused at admission, by reason.",
            ["reason"], registry=r)
        self.step_duration = Histogram(
            "moelens_step_duration_seconds",
            "Wall time of one iteration (the Step RPC as the coordinator saw it).",
            buckets=STEP_BUCKETS, registry=r)
        self.step_phase = Histogram(
            "moelens_step_phase_seconds",
            "Seconds of one iteration spent per phase, as the expert service measured them. "
            "Phases overlap when pipelined, so they may add up to more than the step.",
            ["phase"], buckets=STEP_BUCKETS, registry=r)
        self.weight_bytes_streamed = Counter(
            "moelens_weight_bytes_streamed", "Bytes of weights copied host-to-device for layers "
            "not resident on the accelerator.", registry=r)
        self.pipeline_overlap = Counter(
            "moelens_pipeline_overlap_seconds", "Seconds during which accelerator GEMMs and CPU "
            "attention of different token groups ran at the same time.", registry=r)
        self.token_budget = Gauge(
            "moelens_token_budget", "Tokens per iteration the scheduler aims for (n_real from "
            "the performance model).", registry=r)
        self.kv_blocks_used = Gauge(
            "moelens_kv_cache_used_blocks", "KV blocks held by running sequences.", registry=r)
        self.kv_blocks_total = Gauge(
            "moelens_kv_cache_total_blocks", "KV blocks in the attention service's pool.",
            registry=r)
        self.predicted_tps = Gauge(
            "moelens_predicted_tokens_per_second",
            "Throughput the performance model predicts for the current workload, tokens/s.",
            registry=r)
        self.measured_tps = Gauge(
            "moelens_measured_tokens_per_second",
            "Throughput measured over the same window as the prediction, tokens/s.", registry=r)
        self.bottleneck = Gauge(
            "moelens_bottleneck", "1 for the resource the performance model says bounds "
            "throughput now, 0 for the others.", ["resource"], registry=r)
        for resource in BOTTLENECK_RESOURCES:
            self.bottleneck.labels(resource).set(0)

    def observe_step(self, stats: StepStats) -> None:
        """One scheduler iteration: token counters, queue and KV gauges, time split."""
        self.prompt_tokens.inc(stats.num_prefill_tokens)
        self.generation_tokens.inc(stats.num_decode_tokens)
        self.num_preemptions.inc(stats.num_preempted)
        self.iteration_tokens.observe(stats.num_tokens)
        self.set_queue(stats.num_running, stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_usage)
        self.kv_blocks_used.set(stats.num_used_blocks)
        self.kv_blocks_total.set(stats.num_total_blocks)
        self.token_budget.set(stats.token_budget)
        self.step_duration.observe(stats.wall_s)
        timings = stats.timings
        for phase in STEP_PHASES:
            self.step_phase.labels(phase).observe(getattr(timings, f"{phase}_s"))
        self.weight_bytes_streamed.inc(timings.weight_bytes_streamed)
        self.pipeline_overlap.inc(timings.overlap_s)

    def observe_request(self, stats: RequestStats) -> None:
        """A finished request: success by reason, latency histograms, per-request token counts."""
        if stats.finish_reason not in FINISH_REASONS:
            raise ValueError(f"RequestStats.finish_reason {stats.finish_reason!r}: "
                             f"use one of {', '.join(FINISH_REASONS)}")
        self.request_success.labels(stats.finish_reason).inc()
        self.request_prompt_tokens.observe(stats.num_prompt_tokens)
        self.request_generation_tokens.observe(stats.num_generation_tokens)
        self.queue_time.observe(stats.queue_s)
        self.e2e_latency.observe(stats.e2e_s)
        if stats.num_generation_tokens > 0:
            self.ttft.observe(stats.ttft_s)
        for seconds in stats.inter_token_s:
            self.inter_token.observe(seconds)
        if stats.num_generation_tokens > 1:
            decode_s = stats.e2e_s - stats.ttft_s
            self.time_per_output_token.observe(decode_s / (stats.num_generation_tokens - 1))

    def observe_prediction(self, stats: PredictionStats) -> None:
        """The performance model's latest prediction beside the measurement; one-hot bottleneck.

        An empty `bottleneck` means "not predicted yet": every resource reads 0.
        """
        if stats.bottleneck and stats.bottleneck not in BOTTLENECK_RESOURCES:
            raise ValueError(f"PredictionStats.bottleneck {stats.bottleneck!r}: "
                             f"use one of {', '.join(BOTTLENECK_RESOURCES)}")
        self.predicted_tps.set(stats.predicted_tokens_per_s)
        self.measured_tps.set(stats.measured_tokens_per_s)
        for resource in BOTTLENECK_RESOURCES:
            self.bottleneck.labels(resource).set(1 if resource == stats.bottleneck else 0)

    def set_queue(self, num_running: int, num_waiting: int) -> None:
        self.num_requests_running.set(num_running)
        self.num_requests_waiting.set(num_waiting)

    def observe_rejected(self, reason: str) -> None:
        """A request refused at admission (e.g. "queue_full", "prompt_too_long")."""
        self.rejected.labels(reason).inc()
