"""The performance model against the paper's own numbers, a slow loop reference, and its errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import pytest

from moelens.config import parse_config
from moelens.profile import HardwareProfile, load_profile, save_profile
from services.coordinator.perf_model import (Deployment, ModelSpec, Workload, eq2_token_threshold,
                                             iteration_cost, place_weights, pme, pme_exact,
                                             predict, stage1_bound, stage2_predict, token_budget,
                                             with_kv_bytes, workload_pme)

GIB = 2 ** 30
MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    rope_theta=1e6, max_position_embeddings=32768)
SMALL = dict(MIXTRAL_8X7B, vocab_size=128, hidden_size=256, intermediate_size=512,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def mixtral_spec() -> ModelSpec:
    return ModelSpec.from_config(parse_config(MIXTRAL_8X7B), weight_bytes=2)


def make_profile(spec: ModelSpec, **overrides) -> HardwareProfile:
    """An A40-like profile; IO-bound by default (attention and host memory far from binding)."""
    fields = dict(io_bandwidth_bytes_per_s=19.5e9, gemm_intercept_s=0.0,
                  gemm_slope_s_per_token=spec.layer_flops_per_token[0] / 150e12,
                  attention_kv_bytes_per_s=1e15, host_memory_bandwidth_bytes_per_s=1e15,
                  exchange_fixed_s=0.0, exchange_s_per_byte=0.0, is_accelerator_separate=True,
                  gemm_layer_flops_per_token=spec.layer_flops_per_token[0],
                  gemm_layer_weight_bytes=float(spec.layer_weight_bytes(0)), dtype="float16")
    fields.update(overrides)
    return HardwareProfile(**fields)


# Stage 1: the paper's numbers ---------------------------------------------------------------

@pytest.mark.parametrize("p,g,expected", [(98, 32, "0.0356"), (98, 256, "0.00612"),
                                          (926, 128, "0.00832")])
def test_pme_matches_paper(p, g, expected):
    assert f"{pme(p, g):.3g}" == expected
    assert pme_exact(p, g) == pytest.approx(pme(p, g), rel=0.05)  # Eq. 3's approximation


def test_eq2_a40():
    assert eq2_token_threshold(150e12, 32e9, num_experts=8, top_k=2) == pytest.approx(18750)


def test_token_budget_reduces_to_eq2_for_experts_only_layers():
    """With only expert weights, a zero intercept and every layer streamed, n_real is Eq. 2."""
    h, i, e, k, layers = 4096, 14336, 8, 2, 4
    spec = ModelSpec(num_layers=layers, hidden_size=h, num_experts=e, top_k=k, gqa_group_size=4,
                     q_size=h, kv_size=1024, vocab_size=8, expert_intermediate_size=i,
                     weight_bytes_per_param=2, activation_bytes=2, kv_bytes_per_token=1024,
                     layer_attention_bytes=(0,) * layers,
                     layer_mlp_bytes=(e * 3 * h * i * 2,) * layers,
                     fixed_bytes=0, layer_flops_per_token=(2.0 * k * 3 * h * i,) * layers,
                     head_flops_per_row=0.0)
    profile = make_profile(spec, io_bandwidth_bytes_per_s=32e9)
    minimum = spec.workspace_bytes(20_000) + 2 * spec.layer_weight_bytes(0)
    deployment = Deployment(kv_cache_bytes=10 * GIB, device_memory_bytes=minimum,
                            max_num_tokens=20_000)
    assert place_weights(spec, deployment).num_resident_layers == 0
    assert token_budget(spec, profile, deployment) == pytest.approx(18750, abs=1)


def test_throughput_linear_below_turning_point_and_flat_above():
    spec, workload = mixtral_spec(), Workload(98, 256, 1000)
    profile = make_profile(spec)
    base = Deployment(kv_cache_bytes=GIB, device_memory_bytes=40 * GIB, max_num_tokens=50_000)
    turning = stage1_bound(spec, profile, workload, base).turning_point_bytes
    below = [stage1_bound(spec, profile, workload, with_kv_bytes(base, int(turning * f)))
             for f in (0.2, 0.4, 0.8)]
    slopes = [b.throughput / b.kv_capacity_tokens for b in below]
    assert slopes == pytest.approx([slopes[0]] * 3, rel=1e-9)
    assert all(b.bottleneck == "kv_capacity" for b in below)
    assert below[0].throughput == pytest.approx(below[0].t_max, rel=1e-9)  # Eq. 4, linear part
    above = [stage1_bound(spec, profile, workload, with_kv_bytes(base, int(turning * f)))
             for f in (1.2, 2.0, 4.0)]
    assert [a.throughput for a in above] == pytest.approx([above[0].throughput] * 3, rel=1e-9)
    assert above[0].throughput == pytest.approx(above[0].t_gpu, rel=1e-6)
    assert above[0].bottleneck in ("gemm", "io")


def test_resident_weights_budget_from_gemm_line():
    """δ = 0: n_real is where the intercept is 2% of the GEMM time (49 · A / B), capped."""
    spec = mixtral_spec()
    profile = make_profile(spec, gemm_intercept_s=1e-3)
    deployment = Deployment(kv_cache_bytes=100 * GIB, max_num_tokens=10 ** 6)
    assert place_weights(spec, deployment).streamed_bytes == 0
    expected = 49 * 1e-3 / profile.gemm_slope_s_per_token
    assert token_budget(spec, profile, deployment) == math.ceil(expected)
    capped = dataclasses.replace(deployment, max_num_tokens=1000)
    assert token_budget(spec, profile, capped) == 1000


# Stage 2 ------------------------------------------------------------------------------------

def test_stage2_converges_to_stage1_as_job_grows():
    spec, profile = mixtral_spec(), make_profile(mixtral_spec())
    deployment = Deployment(kv_cache_bytes=20 * GIB, block_size=1, device_memory_bytes=40 * GIB,
                            max_num_tokens=50_000)
    gaps = []
    for k in (100, 1000, 10_000, 1_000_000):
        pred = predict(spec, profile, Workload(98, 256, k), deployment)
        gaps.append(abs(pred.stage2.total_tokens_per_s / pred.stage1.throughput - 1))
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 0.01


def _loop_reference(workload: Workload, q: int, block_size: int):
    """Slow reference: admit q requests per iteration, step each one through its g iterations.

    Returns per iteration (tokens, decode rows, KV tokens read, blocks held, live requests)."""
    p, g, k = workload.prompt_len, workload.gen_len, workload.num_requests
    admitted, live, out = 0, [], []
    while admitted < k or live:
        live = [s + 1 for s in live if s + 1 < g]
        admit = min(q, k - admitted)
        admitted += admit
        live += [0] * admit
        if not live:
            break
        decode = sum(1 for s in live if s > 0)
        out.append(((len(live) - decode) * p + decode, decode, sum(p + s for s in live if s > 0),
                    sum(-(-(p + s) // block_size) for s in live), len(live)))
    return out


def test_stage2_iterations_match_loop_reference():
    """q integral (the token budget binds exactly): every iteration agrees with a slow loop."""
    spec = mixtral_spec()
    profile = make_profile(spec, gemm_intercept_s=1e-4, attention_kv_bytes_per_s=1e9,
                           exchange_fixed_s=1e-5, exchange_s_per_byte=1e-10)
    workload = Workload(prompt_len=30, gen_len=5, num_requests=40)
    deployment = Deployment(kv_cache_bytes=10 * GIB, block_size=16)
    placement = place_weights(spec, deployment)
    pred = stage2_predict(spec, profile, workload, deployment, placement, n_real=4 * (30 + 5 - 1))
    assert pred.admitted_per_iteration == 4
    reference = _loop_reference(workload, 4, 16)
    assert pred.num_iterations == len(reference)
    expected = sum(iteration_cost(spec, profile, placement, t, d, kv, rows).total_s
                   for t, d, kv, _, rows in reference)
    assert pred.total_time_s == pytest.approx(expected, rel=1e-9)
    steady = [x for x in reference if x[4] == 4 * 5][0]
    assert pred.tokens_per_steady_iteration == pytest.approx(steady[0])
    assert pred.kv_blocks_steady == pytest.approx(steady[3])
    held = 4 * sum(30 + j for j in range(5))
    assert pred.kv_fragmentation == pytest.approx(1 - held / (steady[3] * 16))


def test_stage2_single_request_lives_g_iterations():
    spec = mixtral_spec()
    pred = predict(spec, make_profile(spec), Workload(10, 7, 1),
                   Deployment(kv_cache_bytes=GIB, device_memory_bytes=40 * GIB))
    assert pred.stage2.num_iterations == 7
    assert pred.stage2.total_time_s == pytest.approx(7 * pred.stage1.delta_s, rel=1e-6)


def test_short_job_admits_at_once_and_is_not_kv_bound():
    """32 short requests fit the cache and the budget together: one admission iteration."""
    spec = mixtral_spec()
    pred = predict(spec, make_profile(spec), Workload(128, 64, 32),
                   Deployment(kv_cache_bytes=4 * GIB, device_memory_bytes=40 * GIB))
    assert pred.stage2.num_admission_iterations == 1 and pred.stage2.num_iterations == 64
    assert pred.bottleneck != "kv_capacity"
    tight = Deployment(kv_cache_bytes=(32 * 192 // 3) * spec.kv_bytes_per_token,
                       device_memory_bytes=40 * GIB)
    slow = predict(spec, make_profile(spec), Workload(128, 64, 32), tight)
    assert slow.stage2.num_admission_iterations > 1 and slow.bottleneck == "kv_capacity"


def test_many_classes_are_binned_closely(monkeypatch):
    import random

    from services.coordinator import perf_model_stage2
    rng = random.Random(0)
    workload = Workload.from_pairs([(rng.randint(16, 1024), rng.randint(8, 256))
                                    for _ in range(300)])
    spec = mixtral_spec()
    deployment = Deployment(kv_cache_bytes=8 * GIB, device_memory_bytes=40 * GIB)
    binned = predict(spec, make_profile(spec), workload, deployment).stage2
    monkeypatch.setattr(perf_model_stage2, "MAX_CLASSES", 1000)
    exact = predict(spec, make_profile(spec), workload, deployment).stage2
    assert binned.total_time_s == pytest.approx(exact.total_time_s, rel=0.05)


def test_mixed_workload_pme_and_prediction():
    same = Workload.from_pairs([(98, 32)] * 10)
    assert workload_pme(same) == pytest.approx(pme(98, 32))
    mixed = Workload.from_pairs([(98, 32), (926, 128), (98, 256)] * 20)
    assert len(mixed.classes()) == 3
    spec = mixtral_spec()
    pred = predict(spec, make_profile(spec), mixed,
                   Deployment(kv_cache_bytes=8 * GIB, device_memory_bytes=40 * GIB))
    assert pred.stage2.num_iterations >= 256 and pred.stage2.output_tokens_per_s > 0


# Host memory contention and host kinds ---------------------------------------------------------

def test_host_memory_contention_stretches_the_iteration():
    """Weights streamed + KV read over the socket's bandwidth set the time when they exceed it."""
    spec = mixtral_spec()
    deployment = Deployment(kv_cache_bytes=210 * 10 ** 9, device_memory_bytes=40 * GIB,
                            max_num_tokens=50_000)
    placement = place_weights(spec, deployment)
    kv_tokens = 210e9 / spec.kv_bytes_per_token
    roomy = make_profile(spec, attention_kv_bytes_per_s=60e9,
                         host_memory_bandwidth_bytes_per_s=1e12)
    tight = dataclasses.replace(roomy, host_memory_bandwidth_bytes_per_s=60e9)
    free = iteration_cost(spec, roomy, placement, 10_000, 9_000, kv_tokens, 9_000)
    cost = iteration_cost(spec, tight, placement, 10_000, 9_000, kv_tokens, 9_000)
    expected = (placement.streamed_bytes + 210e9) / 60e9
    assert cost.total_s == pytest.approx(expected) and cost.total_s > free.total_s
    assert cost.dominant == "host_memory_bandwidth"
    pred = predict(spec, tight, Workload(98, 256, 100_000), deployment)
    assert pred.is_host_memory_contended and pred.bottleneck == "host_memory_bandwidth"


def test_cpu_only_host_adds_gemm_and_attention():
    spec = mixtral_spec()
    placement = place_weights(spec, Deployment(kv_cache_bytes=GIB))
    separate = make_profile(spec, gemm_intercept_s=1e-3, attention_kv_bytes_per_s=1e9)
    shared = dataclasses.replace(separate, is_accelerator_separate=False)
    a = iteration_cost(spec, separate, placement, 1000, 500, 50_000, 500)
    b = iteration_cost(spec, shared, placement, 1000, 500, 50_000, 500)
    assert a.total_s == pytest.approx(max(a.gemm_s, a.attention_s))
    assert b.total_s == pytest.approx(b.gemm_s + b.attention_s)
    assert a.dominant == b.dominant == "cpu_attention"


# Errors -----------------------------------------------------------------------------------------

def test_device_budget_below_double_buffer_names_the_minimum():
    spec = mixtral_spec()
    with pytest.raises(ValueError, match=r"at least \d+\.\d+ GiB"):
        place_weights(spec, Deployment(kv_cache_bytes=GIB, device_memory_bytes=GIB))


def test_kv_smaller_than_one_request():
    spec = mixtral_spec()
    deployment = Deployment(kv_cache_bytes=64 * spec.kv_bytes_per_token)
    with pytest.raises(ValueError, match="kv_cache_bytes >= "):
        predict(spec, make_profile(spec), Workload(100, 28, 4), deployment)


@pytest.mark.parametrize("kwargs,field", [
    (dict(kv_cache_bytes=0), "kv_cache_bytes"),
    (dict(kv_cache_bytes=1, block_size=0), "block_size"),
    (dict(kv_cache_bytes=1, device_memory_bytes=-1), "device_memory_bytes"),
    (dict(kv_cache_bytes=1, max_num_tokens=0), "max_num_tokens")])
def test_bad_deployment(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Deployment(**kwargs)


def test_bad_workload():
    with pytest.raises(ValueError, match="gen_len"):
        Workload(10, 0, 1)
    with pytest.raises(ValueError, match="num_requests"):
        Workload(10, 5, 3, pairs=((1, 1),))
    with pytest.raises(ValueError, match="empty"):
        Workload.from_pairs([])


# Profile JSON -----------------------------------------------------------------------------------

def test_profile_round_trip(tmp_path):
    profile = make_profile(mixtral_spec(), device="cuda:0 test", gemm_curve_tokens=(1, 32),
                           gemm_curve_s=(1e-4, 2e-3))
    save_profile(profile, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == profile


@pytest.mark.parametrize("change,field", [
    (lambda d: d.pop("gemm_slope_s_per_token"), "gemm_slope_s_per_token"),
    (lambda d: d.update(io_bandwidth_bytes_per_s=-1.0), "io_bandwidth_bytes_per_s"),
    (lambda d: d.update(exchange_fixed_s=-1e-6), "exchange_fixed_s"),
    (lambda d: d.update(gemm_intercept_s=float("nan")), "gemm_intercept_s"),
    (lambda d: d.update(host_memory_bandwidth_bytes_per_s="fast"), "host_memory_bandwidth"),
    (lambda d: d.update(is_accelerator_separate="yes"), "is_accelerator_separate"),
    (lambda d: d.update(bogus=1), "bogus"),
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d.update(gemm_curve_tokens=[1, 2], gemm_curve_s=[1e-3]), "same length"),
    (lambda d: d.update(gemm_curve_tokens=[2, 2], gemm_curve_s=[1e-3, 2e-3]),
     "gemm_curve_tokens must be strictly increasing"),
    (lambda d: d.update(gemm_curve_tokens=[0], gemm_curve_s=[1e-3]), "gemm_curve_tokens"),
    (lambda d: d.update(gemm_curve_tokens=[1], gemm_curve_s=[-1e-3]), "gemm_curve_s"),
    (lambda d: d.update(gemm_curve_tokens=[1], gemm_curve_s=[float("inf")]), "gemm_curve_s"),
    (lambda d: d.update(gemm_curve_s=3.0), "gemm_curve_s must be a list")])
def test_bad_profiles_name_the_field(tmp_path, change, field):
    raw = make_profile(mixtral_spec()).to_dict()
    change(raw)
    (tmp_path / "p.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=field):
        load_profile(tmp_path / "p.json")


def test_profile_not_json(tmp_path):
    (tmp_path / "p.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_profile(tmp_path / "p.json")


# Profiler ---------------------------------------------------------------------------------------

def test_fit_line():
    from moelens.profiler import fit_line
    assert fit_line([1, 2, 4], [3, 5, 9]) == pytest.approx((1.0, 2.0))
    intercept, slope = fit_line([1, 2, 3], [0.5, 2.0, 3.5])  # would fit -1 + 1.5 x
    assert intercept == 0.0 and slope == pytest.approx(1.0)  # median of y / x
    with pytest.raises(ValueError):
        fit_line([1, 1], [1, 2])


def test_fit_line_ignores_one_noisy_point():
    """Least squares through these points gives intercept 7.1 ms (a 29% error); the robust fit
    keeps the line the other five lie on."""
    from moelens.profiler import fit_line
    xs = [32, 64, 128, 256, 512, 1024]
    ys = [0.01 + 2e-4 * x for x in xs]
    ys[4] *= 0.7  # one timing taken in a fast window
    assert fit_line(xs, ys) == pytest.approx((0.01, 2e-4))


def test_profiler_quick_gives_positive_numbers():
    import torch
    from moelens.profiler import profile_local
    # One thread: on a busy shared machine multi-threaded tiny GEMMs wait on descheduled peers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profile = profile_local(parse_config(SMALL), quick=True)
    finally:
        torch.set_num_threads(threads)
    for name in ("io_bandwidth_bytes_per_s", "gemm_slope_s_per_token", "attention_kv_bytes_per_s",
                 "host_memory_bandwidth_bytes_per_s", "exchange_s_per_byte"):
        value = getattr(profile, name)
        assert math.isfinite(value) and value > 0, name
    assert profile.gemm_intercept_s >= 0 and not profile.is_accelerator_separate
    assert HardwareProfile.from_dict(profile.to_dict()) == profile


def test_profiler_measures_in_the_served_dtypes():
    """bf16 GEMMs (AMX panels where the CPU has them, torch otherwise) and a bf16 KV cache."""
    import torch
    from moelens.profiler import measure_attention_bandwidth, measure_gemm_line
    from services.attention_cpu import kernel
    cfg = parse_config(SMALL)
    line = measure_gemm_line(cfg, (16, 64), dtype=torch.bfloat16, repeats=1)
    assert all(s > 0 for s in line.seconds)
    kv = measure_attention_bandwidth(cfg, kernel.paged_attention, 1 << 20, dtype=torch.bfloat16,
                                     repeats=1)
    assert math.isfinite(kv) and kv > 0


# CLI --------------------------------------------------------------------------------------------

def _predict_args(tmp_path, **overrides) -> argparse.Namespace:
    from moelens_cli import predict as cli
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    save_profile(make_profile(mixtral_spec()), tmp_path / "p.json")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = ["--model", str(model), "--profile", str(tmp_path / "p.json"), "--prompt-len", "98",
            "--gen-len", "32", "--num-requests", "500", "--kv-cache-gb", "20",
            "--device-memory-gb", "40", "--dtype", "float16", "--kv-dtype", "float16",
            "--json", str(tmp_path / "out.json")]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def test_predict_cli_prints_and_writes_json(tmp_path, capsys):
    from moelens_cli import predict as cli
    assert cli.run(_predict_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "turning point M*" in out and "bottleneck:" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["stage2"]["num_iterations"] > 0 and saved["n_real"] > 0


def test_predict_cli_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    from moelens_cli import predict as cli
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.run(_predict_args(tmp_path, plot=tmp_path / "x.png")) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_predict_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from moelens_cli import predict as cli
    assert cli.run(_predict_args(tmp_path, plot=tmp_path / "x.png")) == 0
    assert (tmp_path / "x.png").stat().st_size > 0


def test_predict_cli_errors(tmp_path, capsys):
    from moelens_cli import predict as cli
    assert cli.run(_predict_args(tmp_path, device_memory_gb=1)) == 2
    assert "at least" in capsys.readouterr().err


def test_profile_cli_quick(tmp_path, monkeypatch, capsys):
    from moelens_cli import profile_cmd
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMALL))
    monkeypatch.setattr(profile_cmd, "_attention_kernel", lambda: None)  # no native build here
    parser = argparse.ArgumentParser()
    profile_cmd.add_arguments(parser)
    import torch
    threads = torch.get_num_threads()
    try:
        args = parser.parse_args(["--model", str(model), "--out", str(tmp_path / "p.json"),
                                  "--quick"])
        assert profile_cmd.run(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert load_profile(tmp_path / "p.json").gemm_slope_s_per_token > 0
    assert "GEMM line per layer" in capsys.readouterr().out
