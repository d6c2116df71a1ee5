"""The attention service's Prometheus exporter: per-layer attention time, KV bytes read, capacity.

`rate(moelens_attention_kv_bytes_read_total) / rate(moelens_attention_layer_seconds_sum)` is the
kernel's achieved KV read bandwidth while busy, the number to hold against the host's memory
bandwidth when the performance model names cpu_attention or host_memory_bandwidth the bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LAYER_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Seconds of one layer's decode attention: tens of µs for a few rows to seconds for long KV."""


class AttentionMetrics:
    """All attention_cpu series, registered on `registry` (never the global default one)."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.layer_seconds = Histogram(
            "moelens_attention_layer_seconds", "Seconds of decode attention for one layer call.",
            buckets=LAYER_BUCKETS, registry=r)
        self.rows = Counter(
            "moelens_attention_rows", "Query rows (decode tokens) attended, summed over layers.",
            registry=r)
        self.kv_bytes_read = Counter(
            "moelens_attention_kv_bytes_read", "Bytes of K and V read by the attention kernel.",
            registry=r)
        self.num_blocks = Gauge(
            "moelens_attention_kv_num_blocks", "KV blocks in the host-memory pool.", registry=r)
        self.num_used_blocks = Gauge(
            "moelens_attention_kv_num_used_blocks", "KV blocks holding sequences' tokens.",
            registry=r)
        self.block_size = Gauge(
            "moelens_attention_kv_block_size_tokens", "Tokens per KV block.", registry=r)
        self.usage = Gauge(
            "moelens_attention_kv_usage_perc", "KV pool usage. 1 means 100 percent usage.",
            registry=r)
        self.kernel_fallback = Gauge(
            "moelens_attention_kernel_fallback", "1 when the C++ attention kernel could not be "
            "built and the torch reference runs instead (much slower), else 0.", registry=r)
        self.kernel_info = Gauge(
            "moelens_attention_kernel_info", "1 for the attention kernel backend in use.",
            ["backend"], registry=r)
        self.num_threads = Gauge(
            "moelens_attention_num_threads", "Threads the attention kernel runs on.", registry=r)

    def observe_layer(self, seconds: float, num_rows: int, kv_bytes_read: int) -> None:
        self.layer_seconds.observe(seconds)
        self.rows.inc(num_rows)
        self.kv_bytes_read.inc(kv_bytes_read)

    def set_capacity(self, num_blocks: int, num_used_blocks: int, block_size: int) -> None:
        self.num_blocks.set(num_blocks)
        self.num_used_blocks.set(num_used_blocks)
        self.block_size.set(block_size)
        self.usage.set(num_used_blocks / num_blocks if num_blocks else 0.0)

    def set_kernel(self, backend: str, is_fallback: bool, num_threads: int) -> None:
        self.kernel_info.clear()
        self.kernel_info.labels(backend).set(1)
        self.kernel_fallback.set(1 if is_fallback else 0)
        self.num_threads.set(num_threads)
