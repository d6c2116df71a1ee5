"""The benchmarks' arithmetic and formats (no timing thresholds), and one real tiny run.

Cross-checks use code the benches did not write: the performance model's per-token FLOPs, the
coordinator's own Prometheus exporter, numpy's statistics, vLLM's printed layout.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from moelens import panel_gemm
from moelens.config import load_config
from moelens.stats import StepStats, StepTimings
from moelens_cli import bench_common as common
from moelens_cli import bench_serve, bench_steps
from moelens_cli.main import main as cli_main
from services.coordinator.metrics import CoordinatorMetrics
from services.coordinator.perf_model import ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "peers"))
import peer_common  # noqa: E402
import report  # noqa: E402

BENCH_MIXTRAL = dict(model_type="mixtral", vocab_size=32000, hidden_size=1024,
                     intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16,
                     num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                     rope_theta=1e6, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, architectures=["MixtralForCausalLM"])


@pytest.fixture
def bench_cfg(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BENCH_MIXTRAL))
    return load_config(tmp_path)


# Workloads -------------------------------------------------------------------------------------
def test_fixed_workload_is_exact_and_seeded():
    requests = common.make_requests("fixed", 16, 1000, seed=3, prompt_len=128, gen_len=64)
    assert [(len(r.prompt_ids), r.gen_len) for r in requests] == [(128, 64)] * 16
    assert all(0 <= t < 1000 for r in requests for t in r.prompt_ids)
    again = common.make_requests("fixed", 16, 1000, seed=3, prompt_len=128, gen_len=64)
    other = common.make_requests("fixed", 16, 1000, seed=4, prompt_len=128, gen_len=64)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in requests]
    assert [r.prompt_ids for r in other] != [r.prompt_ids for r in requests]


def test_peer_prompts_are_ours():
    ours = common.make_requests("fixed", 8, 32000, seed=0, prompt_len=128, gen_len=64)
    assert peer_common.make_prompts(8, 128, 32000, seed=0) == [r.prompt_ids for r in ours]


@pytest.mark.parametrize("name", ["chat", "rag", "long-gen"])
def test_distributions_match_their_statistics(name):
    shape = common.WORKLOADS[name]
    pairs = np.array(common.sample_lengths(shape, 20000, seed=0))
    prompts, gens = pairs[:, 0], pairs[:, 1]
    assert prompts.mean() == pytest.approx(shape.prompt_mean, rel=0.05)
    assert gens.mean() == pytest.approx(shape.gen_mean, rel=0.02)
    spread = round(shape.gen_mean * shape.gen_spread)
    assert gens.min() >= shape.gen_mean - spread and gens.max() <= shape.gen_mean + spread
    # lognormal: mean above median, and a tail reaching several times the median
    assert np.median(prompts) < prompts.mean()
    assert np.percentile(prompts, 99) > 1.5 * np.median(prompts)


def test_chat_lengths_match_published_ranges():
    pairs = np.array(common.sample_lengths(common.WORKLOADS["chat"], 5000, seed=1))
    assert pairs[:, 1].min() == 128 and pairs[:, 1].max() == 256
    assert np.percentile(pairs[:, 0], 99) > 3 * np.median(pairs[:, 0])  # long-tailed


def test_length_overrides_and_context_limit():
    shape = common.WORKLOADS["rag"]
    pairs = np.array(common.sample_lengths(shape, 5000, seed=0, prompt_len=300, gen_len=32))
    assert pairs[:, 0].mean() == pytest.approx(300, rel=0.05)
    assert set(pairs[:, 1]) == {32}
    clipped = common.sample_lengths(shape, 200, seed=0, max_model_len=1024)
    assert max(p + g for p, g in clipped) <= 1024
    with pytest.raises(ValueError, match="--gen-len"):
        common.sample_lengths(common.WORKLOADS["fixed"], 4, 0, 10, 600, max_model_len=512)
    with pytest.raises(ValueError, match="--num-requests"):
        common.sample_lengths(shape, 0, seed=0)
    with pytest.raises(ValueError, match="--workload"):
        common.make_requests("sharegpt", 4, 100)


# Roofline --------------------------------------------------------------------------------------
def test_job_flops_match_the_performance_model(bench_cfg):
    pairs = [(128, 64)] * 3 + [(7, 1)]
    flops = common.job_gemm_flops(bench_cfg, pairs)
    spec = ModelSpec.from_config(bench_cfg, weight_bytes=4)
    tokens = sum(p + g - 1 for p, g in pairs)
    rows = sum(g for _, g in pairs)
    expected = tokens * sum(spec.layer_flops_per_token) + rows * spec.head_flops_per_row
    assert flops.total == pytest.approx(expected, rel=1e-12)
    # peers.md: ~155 M active parameters per token, lm_head (32000 x 1024) included
    per_token = (flops.total - flops.by_kind["lm_head"]) / tokens
    assert per_token == pytest.approx(2 * (155e6 - 32000 * 1024), rel=0.01)


def test_roofline_arithmetic():
    flops = common.JobFlops({"attention_proj": 2e9, "router": 1e6, "experts": 8e9,
                             "lm_head": 1e9})
    rates = common.GemmRates({"attention_proj": 1e9, "router": 1e9, "experts": 2e9,
                              "lm_head": 0.5e9}, threads=2, rows=4096)
    line = common.roofline(flops, rates)
    min_time = 2.0 + 1e-3 + 4.0 + 2.0
    assert line.min_time_s == pytest.approx(min_time)
    assert line.peak_flops_per_s == pytest.approx(flops.total / min_time)
    assert line.fraction(2 * min_time) == pytest.approx(0.5)
    assert line.fraction(0.0) == 0.0
    later = common.GemmRates({"attention_proj": 3e9, "router": 3e9, "experts": 1e9,
                              "lm_head": 0.5e9}, threads=2, rows=4096)
    assert rates.best(later).flops_per_s == {"attention_proj": 3e9, "router": 3e9,
                                             "experts": 2e9, "lm_head": 0.5e9}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_measured_gemm_rates_are_positive(bench_cfg, dtype):
    rates = common.measure_gemm_rates(bench_cfg, threads=1, rows=32, head_rows=8, repeats=1,
                                      dtype=dtype)
    assert set(rates.flops_per_s) == set(common.GEMM_KINDS)
    assert all(r > 0 and math.isfinite(r) for r in rates.flops_per_s.values())


# Formats ---------------------------------------------------------------------------------------
def test_throughput_line_is_vllms():
    result = common.ThroughputResult(10, 1280, 640, 2.0)
    assert common.format_throughput(result) == (
        "Throughput: 5.00 requests/s, 960.00 total tokens/s, 320.00 output tokens/s")


def _records() -> list[bench_serve.RequestRecord]:
    return [bench_serve.RequestRecord(True, 10, 3, 0.1, [0.02, 0.04], 0.16),
            bench_serve.RequestRecord(True, 20, 1, 0.3, [], 0.3),
            bench_serve.RequestRecord(False, 5, error="boom")]


def test_serving_metrics_follow_vllm_definitions():
    metrics = bench_serve.serving_metrics(_records(), 2.0, [50, 99])
    assert (metrics.completed, metrics.failed) == (2, 1)
    assert metrics.total_input_tokens == 30 and metrics.total_output_tokens == 4
    assert metrics.request_throughput == 1.0 and metrics.output_throughput == 2.0
    assert metrics.ms["ttft"]["mean"] == pytest.approx(200.0)
    assert metrics.ms["tpot"]["mean"] == pytest.approx(30.0)  # (0.16 - 0.1) / 2, one request
    assert metrics.ms["itl"]["median"] == pytest.approx(30.0)
    assert metrics.ms["itl"]["p99"] == pytest.approx(np.percentile([20.0, 40.0], 99))
    assert metrics.ms["e2el"]["p50"] == pytest.approx(230.0)


def test_serving_block_is_vllms_layout():
    text = bench_serve.format_serving(bench_serve.serving_metrics(_records(), 2.0, [99]), 4)
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[1] == "Successful requests:                     2         "
    assert "Maximum request concurrency:             4         " in lines
    assert "Benchmark duration (s):                  2.00      " in lines
    assert "Request throughput (req/s):              1.00      " in lines
    assert "Output token throughput (tok/s):         2.00      " in lines
    assert "---------------Time to First Token----------------" in lines
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert "Mean TTFT (ms):                          200.00    " in lines
    for name in ("TTFT", "TPOT", "ITL", "E2EL"):
        assert any(line.startswith(f"Median {name} (ms):") for line in lines)
        assert any(line.startswith(f"P99 {name} (ms):") for line in lines)
    assert lines[-1] == "=" * 50


async def _collect(requests, rate):
    return [r async for r in bench_serve.arrivals(requests, rate, 1.0, seed=0)]


def test_arrivals_yield_every_request_in_order():
    import asyncio
    requests = common.make_requests("fixed", 3, 50, prompt_len=2, gen_len=1)
    assert asyncio.run(_collect(requests, math.inf)) == requests
    assert asyncio.run(_collect(requests, 1000.0)) == requests


def test_step_timings_from_the_coordinators_exporter():
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    before = bench_steps.parse_step_metrics(generate_latest(registry).decode())
    for gemm in (0.5, 0.25):
        metrics.observe_step(StepStats(
            step_id=1, num_prefill_tokens=100, num_decode_tokens=20, num_seqs=4, wall_s=1.0,
            timings=StepTimings(total_s=1.0, gemm_s=gemm, attention_s=0.125, exchange_s=0.0625,
                                weight_bytes_streamed=1000, overlap_s=0.03125),
            num_running=4, num_waiting=0, num_used_blocks=1, num_total_blocks=8,
            num_preempted=1, token_budget=256))
    after = bench_steps.parse_step_metrics(generate_latest(registry).decode())
    steps = bench_steps.summarize_steps(before, after)
    assert (steps.num_steps, steps.step_s) == (2, 2.0)
    assert steps.phase_s["gemm"] == pytest.approx(0.75)
    assert steps.phase_s["attention"] == pytest.approx(0.25)
    assert (steps.num_prompt_tokens, steps.num_decode_tokens) == (200, 40)
    assert (steps.num_preemptions, steps.weight_bytes_streamed) == (2, 2000)
    assert steps.overlap_s == pytest.approx(0.0625)
    text = bench_steps.format_steps(steps, elapsed_s=4.0)
    assert "gemm" in text and "18.8%" in text


def test_peer_report_table(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    peer = peer_common.PeerResult("HF", "5.24.0", 2, 128, 64)
    peer.rows = [peer_common.PeerRow(1, 1, 64, 5.0), peer_common.PeerRow(8, 8, 512, 20.0)]
    peer_common.write_result(str(raw / "hf.json"), peer)
    (raw / "ours_bs8.json").write_text(json.dumps({"output_tokens_per_s": 51.2,
                                                   "num_requests": 8}))
    table = report.load_results(raw)
    assert table == {"HF 5.24.0": {1: 12.8, 8: 25.6}, report.OURS: {8: 51.2}}
    text = report.markdown(table, "note")
    assert "| HF 5.24.0 | 12.8 | 25.6 | 25.6 |" in text
    assert "| MoE-Lens (moe-lens bench throughput) | – | 51.2 | 51.2 |" in text
    assert "2.00x" in text


# Expert GEMM bench -----------------------------------------------------------------------------
def test_bench_experts_compares_against_the_gather_path(tmp_path, capsys):
    out = tmp_path / "experts.json"
    code = cli_main(["bench", "experts", "--shapes", "small", "--tokens", "4,32", "--threads",
                     "1", "--repeats", "1", "--max-gather-tokens", "8", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [4, 32]
    assert rows[0]["max_abs_diff"] < 1e-4 and rows[0]["speedup"] > 0
    assert rows[1]["gather_ms"] is None  # above --max-gather-tokens
    if panel_gemm.is_supported():
        assert rows[1]["panels_ms"] > 0 and rows[1]["max_abs_diff"] < 1e-4
    assert "skipped" in capsys.readouterr().out
    assert cli_main(["bench", "experts", "--shapes", "huge"]) == 2


def test_bench_throughput_flag_errors_name_the_flag(capsys):
    assert cli_main(["bench", "throughput", "--num-requests", "0"]) == 2
    assert "--num-requests must be >= 1" in capsys.readouterr().err
    assert cli_main(["bench", "throughput", "--coordinator", "127.0.0.1:1", "--calibrate"]) == 2
    assert "--calibrate reads the coordinator's step timers" in capsys.readouterr().err


# Attention kernel bench ------------------------------------------------------------------------
def test_bench_attention_writes_the_issue_schema(tmp_path, capsys):
    out = tmp_path / "attention.json"
    code = cli_main(["bench", "attention", "--threads", "1", "--contexts", "64", "--batches", "2",
                     "--gqa", "1,4", "--kv-dtypes", "float32,float16", "--head-dim", "80",
                     "--min-seconds", "0.01", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["gqa"], r["kv_dtype"]) for r in rows] == [
        (1, "float32"), (4, "float32"), (1, "float16"), (4, "float16")]
    issue_keys = {"context_len", "batch", "gqa", "head_dim", "kv_dtype", "kv_gbps", "read_gbps",
                  "bandwidth_ratio", "speedup_vs_torch"}
    for row in rows:
        assert issue_keys <= row.keys()
        assert (row["context_len"], row["batch"], row["head_dim"]) == (64, 2, 80)
        for key in ("kv_gbps", "read_gbps", "speedup_vs_torch", "kv_gbps_best", "hot_kv_gbps"):
            assert row[key] > 0, key
        assert row["bandwidth_ratio"] == pytest.approx(row["kv_gbps"] / row["read_gbps"])
        assert row["kv_gbps_best"] >= row["kv_gbps"]
    assert "hot" in capsys.readouterr().out
    assert cli_main(["bench", "attention", "--gqa", "0"]) == 2
    assert "--gqa: values must be >= 1" in capsys.readouterr().err


# One real run through the services ---------------------------------------------------------------
def _tiny_profile(path: Path) -> None:
    path.write_text(json.dumps(dict(
        io_bandwidth_bytes_per_s=5e9, gemm_intercept_s=1e-4, gemm_slope_s_per_token=1e-6,
        attention_kv_bytes_per_s=5e9, host_memory_bandwidth_bytes_per_s=2e10,
        exchange_fixed_s=1e-5, exchange_s_per_byte=1e-10, is_accelerator_separate=False,
        gemm_layer_flops_per_token=1e5, gemm_layer_weight_bytes=1e5, device="cpu",
        dtype="float32")))


@pytest.mark.slow
def test_bench_throughput_real_run(tiny_checkpoints, tmp_path, capsys):
    profile, out = tmp_path / "profile.json", tmp_path / "bench.json"
    _tiny_profile(profile)
    code = cli_main([
        "bench", "throughput", "--model", str(tiny_checkpoints["mixtral"]), "--num-requests",
        "4", "--prompt-len", "8", "--gen-len", "4", "--roofline-rows", "64", "--profile",
        str(profile), "--kv-cache-gb", "0.05", "--block-size", "8", "--expert-threads", "1",
        "--attention-threads", "1", "--max-num-seqs", "4", "--calibrate", "--no-progress",
        "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Throughput: ") and "requests/s," in printed
    assert "% of roofline" in printed and "Prediction:" in printed
    assert "Calibrated prediction:" in printed
    result = json.loads(out.read_text())
    for key in ("requests_per_s", "total_tokens_per_s", "output_tokens_per_s",
                "roofline_fraction", "predicted_output_tokens_per_s", "elapsed_s",
                "kernels_only_predicted_output_tokens_per_s"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["calibrated_prediction"] is True and result["predicted_iterations"] >= 2
    assert result["calibrated_components_s"]["gemm"] > 0
    assert result["calibrated_overheads"]["gemm_scale"] > 0
    assert result["num_output_tokens"] == 16 and result["num_prompt_tokens"] == 32
    assert result["config"]["num_requests"] == 4 and result["config"]["prompt_len"] == 8
    steps = result["step_timings"]
    assert steps["num_steps"] >= 4 and steps["phase_s"]["gemm"] > 0
    assert steps["num_prompt_tokens"] == 32 and steps["num_decode_tokens"] == 12


def test_cpu_steal_share_between_two_readings():
    from moelens_cli.bench_common import cpu_jiffies, steal_fraction
    reading = cpu_jiffies()
    assert reading is not None and 0 <= reading[0] <= reading[1]
    assert steal_fraction((10, 100), (15, 200)) == pytest.approx(0.05)
    assert steal_fraction((10, 100), (10, 100)) is None  # no time passed
    assert steal_fraction(None, reading) is None
