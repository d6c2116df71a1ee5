"""Exporters turn known stats objects into the right Prometheus values; /metrics serves them."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moelens.errors import Unavailable
from moelens.grpc_server import start_server
from moelens.metrics_server import RpcMetrics, serve_metrics, start_metrics_server
from moelens.stats import PredictionStats, RequestStats, StepStats, StepTimings
from moelens_cli.bench_common import free_port_run
from services.attention_cpu.metrics import AttentionMetrics
from services.coordinator.metrics import BOTTLENECK_RESOURCES, CoordinatorMetrics
from services.expert_gpu.metrics import ExpertMetrics

# vLLM's bucket bounds as published in vllm/v1/metrics/loggers.py (the reference we match).
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_TPOT = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
             10.0, 20.0, 40.0, 80.0]
VLLM_REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                        50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
VLLM_ITERATION_TOKENS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def step_stats(**overrides) -> StepStats:
    timings = StepTimings(total_s=0.5, gemm_s=0.2, attention_s=0.15, weight_wait_s=0.05,
                          exchange_s=0.03, prefill_attention_s=0.04, sample_s=0.01,
                          overlap_s=0.1, weight_bytes_streamed=1000)
    values = dict(step_id=1, num_prefill_tokens=30, num_decode_tokens=4, num_seqs=5, wall_s=0.6,
                  timings=timings, num_running=4, num_waiting=2, num_used_blocks=25,
                  num_total_blocks=100, num_preempted=1, token_budget=256)
    values.update(overrides)
    return StepStats(**values)


def bucket_bounds(registry: CollectorRegistry, name: str) -> list[float]:
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name == name:
            return sorted({float(s.labels["le"]) for s in family.samples
                           if s.name == name + "_bucket" and s.labels["le"] != "+Inf"})
    raise KeyError(name)


def test_coordinator_step_counters_accumulate():
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    metrics.observe_step(step_stats())
    metrics.observe_step(step_stats(num_prefill_tokens=0, num_decode_tokens=6, num_preempted=0,
                                    num_running=6, num_waiting=0, num_used_blocks=40))
    value = registry.get_sample_value
    assert value("moelens_prompt_tokens_total") == 30
    assert value("moelens_generation_tokens_total") == 10
    assert value("moelens_num_preemptions_total") == 1
    assert value("moelens_num_requests_running") == 6
    assert value("moelens_num_requests_waiting") == 0
    assert value("moelens_kv_cache_usage_perc") == pytest.approx(0.4)
    assert value("moelens_kv_cache_used_blocks") == 40
    assert value("moelens_kv_cache_total_blocks") == 100
    assert value("moelens_token_budget") == 256
    assert value("moelens_iteration_tokens_total_count") == 2
    assert value("moelens_iteration_tokens_total_sum") == 40
    assert value("moelens_iteration_tokens_total_bucket", {"le": "32.0"}) == 1  # 34 > 32 >= 6
    assert value("moelens_step_duration_seconds_count") == 2
    assert value("moelens_step_duration_seconds_sum") == pytest.approx(1.2)
    assert value("moelens_step_phase_seconds_sum", {"phase": "gemm"}) == pytest.approx(0.4)
    assert value("moelens_step_phase_seconds_sum", {"phase": "prefill_attention"}) == \
        pytest.approx(0.08)
    assert value("moelens_step_phase_seconds_count", {"phase": "sample"}) == 2
    assert value("moelens_weight_bytes_streamed_total") == 2000
    assert value("moelens_pipeline_overlap_seconds_total") == pytest.approx(0.2)


def test_coordinator_request_histograms():
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    metrics.observe_request(RequestStats(finish_reason="length", num_prompt_tokens=12,
                                         num_generation_tokens=5, queue_s=0.2, ttft_s=0.7,
                                         e2e_s=1.5, inter_token_s=[0.2, 0.2, 0.2, 0.2]))
    metrics.observe_request(RequestStats(finish_reason="abort", num_prompt_tokens=3,
                                         num_generation_tokens=0, queue_s=4.0, ttft_s=0.0,
                                         e2e_s=4.0))
    value = registry.get_sample_value
    assert value("moelens_request_success_total", {"finished_reason": "length"}) == 1
    assert value("moelens_request_success_total", {"finished_reason": "abort"}) == 1
    assert value("moelens_request_success_total", {"finished_reason": "stop"}) == 0
    assert value("moelens_time_to_first_token_seconds_count") == 1  # none generated: no TTFT
    assert value("moelens_time_to_first_token_seconds_bucket", {"le": "0.75"}) == 1
    assert value("moelens_time_to_first_token_seconds_bucket", {"le": "0.5"}) == 0
    assert value("moelens_inter_token_latency_seconds_count") == 4
    assert value("moelens_inter_token_latency_seconds_sum") == pytest.approx(0.8)
    assert value("moelens_request_time_per_output_token_seconds_sum") == pytest.approx(0.2)
    assert value("moelens_e2e_request_latency_seconds_sum") == pytest.approx(5.5)
    assert value("moelens_request_queue_time_seconds_bucket", {"le": "5.0"}) == 2
    assert value("moelens_request_queue_time_seconds_bucket", {"le": "2.5"}) == 1
    assert value("moelens_request_prompt_tokens_sum") == 15
    assert value("moelens_request_generation_tokens_sum") == 5
    with pytest.raises(ValueError, match="finish_reason"):
        metrics.observe_request(RequestStats("timeout", 1, 1, 0.0, 0.1, 0.1))


def test_coordinator_buckets_match_vllm():
    registry = CollectorRegistry()
    CoordinatorMetrics(registry, max_model_len=100)
    assert bucket_bounds(registry, "moelens_time_to_first_token_seconds") == VLLM_TTFT
    assert bucket_bounds(registry, "moelens_inter_token_latency_seconds") == VLLM_TPOT
    assert bucket_bounds(registry, "moelens_e2e_request_latency_seconds") == VLLM_REQUEST_LATENCY
    assert bucket_bounds(registry, "moelens_request_queue_time_seconds") == VLLM_REQUEST_LATENCY
    assert bucket_bounds(registry, "moelens_iteration_tokens_total") == VLLM_ITERATION_TOKENS
    # vLLM's build_1_2_5_buckets(100) docstring example
    assert bucket_bounds(registry, "moelens_request_prompt_tokens") == [1, 2, 5, 10, 20, 50, 100]


def test_prediction_and_bottleneck_one_hot():
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    value = registry.get_sample_value
    assert all(value("moelens_bottleneck", {"resource": r}) == 0 for r in BOTTLENECK_RESOURCES)
    for current in ("io", "cpu_attention", "kv_capacity"):
        metrics.observe_prediction(PredictionStats(predicted_tokens_per_s=120.0,
                                                   measured_tokens_per_s=100.0,
                                                   bottleneck=current))
        hot = {r: value("moelens_bottleneck", {"resource": r}) for r in BOTTLENECK_RESOURCES}
        assert hot == {r: (1.0 if r == current else 0.0) for r in BOTTLENECK_RESOURCES}
    metrics.observe_prediction(PredictionStats(120.0, 100.0, bottleneck=""))  # not known yet
    assert all(value("moelens_bottleneck", {"resource": r}) == 0 for r in BOTTLENECK_RESOURCES)
    assert value("moelens_predicted_tokens_per_second") == 120.0
    assert value("moelens_measured_tokens_per_second") == 100.0
    with pytest.raises(ValueError, match="bottleneck"):
        metrics.observe_prediction(PredictionStats(1.0, 1.0, "disk"))


def test_queue_and_rejections():
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    metrics.set_queue(num_running=3, num_waiting=7)
    metrics.observe_rejected("queue_full")
    metrics.observe_rejected("queue_full")
    metrics.observe_rejected("prompt_too_long")
    value = registry.get_sample_value
    assert value("moelens_num_requests_running") == 3
    assert value("moelens_num_requests_waiting") == 7
    assert value("moelens_request_rejected_total", {"reason": "queue_full"}) == 2
    assert value("moelens_request_rejected_total", {"reason": "prompt_too_long"}) == 1


def test_expert_metrics():
    registry = CollectorRegistry()
    metrics = ExpertMetrics(registry)
    timings = StepTimings(total_s=0.3, gemm_s=0.2, attention_s=0.05, weight_wait_s=0.04,
                          overlap_s=0.02, weight_bytes_streamed=512)
    metrics.observe_step(timings, num_tokens=17)
    metrics.observe_step(timings, num_tokens=3)
    metrics.set_layout(num_resident_layers=2, num_streamed_layers=6,
                       device_memory_budget_bytes=4 << 30, weight_bytes_total=10 << 30)
    metrics.set_profile(h2d_bytes_per_s=2.5e10, gemm_slope_s=1e-5, gemm_intercept_s=2e-3)
    value = registry.get_sample_value
    assert value("moelens_expert_step_seconds_count") == 2
    assert value("moelens_expert_phase_seconds_total", {"phase": "gemm"}) == pytest.approx(0.4)
    assert value("moelens_expert_phase_seconds_total", {"phase": "exchange"}) == 0
    assert value("moelens_expert_tokens_total") == 20
    assert value("moelens_expert_weight_bytes_streamed_total") == 1024
    assert value("moelens_expert_pipeline_overlap_seconds_total") == pytest.approx(0.04)
    assert value("moelens_expert_resident_layers") == 2
    assert value("moelens_expert_streamed_layers") == 6
    assert value("moelens_expert_device_memory_budget_bytes") == 4 << 30
    assert value("moelens_expert_weight_bytes") == 10 << 30
    assert value("moelens_expert_profile_h2d_bytes_per_second") == 2.5e10
    assert value("moelens_expert_profile_gemm_slope_seconds") == 1e-5
    assert value("moelens_expert_profile_gemm_intercept_seconds") == 2e-3


def test_attention_metrics():
    registry = CollectorRegistry()
    metrics = AttentionMetrics(registry)
    metrics.observe_layer(0.002, num_rows=8, kv_bytes_read=4096)
    metrics.observe_layer(0.004, num_rows=8, kv_bytes_read=8192)
    metrics.set_capacity(num_blocks=200, num_used_blocks=50, block_size=16)
    metrics.set_kernel("torch", is_fallback=True, num_threads=2)
    metrics.set_kernel("cpp-avx2", is_fallback=False, num_threads=2)
    value = registry.get_sample_value
    assert value("moelens_attention_layer_seconds_count") == 2
    assert value("moelens_attention_layer_seconds_sum") == pytest.approx(0.006)
    assert value("moelens_attention_rows_total") == 16
    assert value("moelens_attention_kv_bytes_read_total") == 12288
    assert value("moelens_attention_kv_num_blocks") == 200
    assert value("moelens_attention_kv_usage_perc") == 0.25
    assert value("moelens_attention_kv_block_size_tokens") == 16
    assert value("moelens_attention_kernel_fallback") == 0
    assert value("moelens_attention_kernel_info", {"backend": "cpp-avx2"}) == 1
    assert value("moelens_attention_kernel_info", {"backend": "torch"}) is None  # replaced
    assert value("moelens_attention_num_threads") == 2


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return reply.read().decode()


def test_metrics_endpoint_serves_exposition():
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    metrics.observe_step(step_stats())
    port = start_metrics_server(free_port_run(1), registry)
    families = {f.name: f for f in text_string_to_metric_families(fetch(port))}
    assert families["moelens_prompt_tokens"].type == "counter"
    assert families["moelens_step_phase_seconds"].type == "histogram"
    samples = {s.name: s.value for s in families["moelens_prompt_tokens"].samples}
    assert samples["moelens_prompt_tokens_total"] == 30
    assert "python_gc_objects_collected_total" not in fetch(port)  # not the global registry


def test_metrics_server_disabled_busy_and_closed():
    registry = CollectorRegistry()
    assert start_metrics_server(0, registry) == 0
    server = serve_metrics(0, registry)
    try:
        fetch(server.port)
        with pytest.raises(Unavailable, match="--metrics-port"):
            serve_metrics(server.port, registry)
    finally:
        server.close()
    with pytest.raises(OSError):
        fetch(server.port)
    with pytest.raises(ValueError, match="--metrics-port"):
        start_metrics_server(70000, registry)


def test_rpc_metrics_observe_real_grpc_calls():
    registry = CollectorRegistry()
    rpc = RpcMetrics(registry, "attention_cpu")
    handle = start_server(lambda server: None, [], "127.0.0.1", 0, max_workers=2,
                          observe=rpc.observe)
    try:
        handle.set_serving(True)
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    finally:
        handle.stop(0)
    value = registry.get_sample_value
    ok = {"service": "attention_cpu", "method": "Check", "code": "OK"}
    not_found = {**ok, "code": "NOT_FOUND"}
    assert value("moelens_rpc_duration_seconds_count", ok) == 1
    assert value("moelens_rpc_duration_seconds_count", not_found) == 1
