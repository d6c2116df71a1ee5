"""`moe-lens bench validate`: the grid, the accuracy arithmetic, the JSON document, the profile
combination and the calibration fit. Fast: no services, no timings."""

from __future__ import annotations

import argparse
import json

import pytest

from moelens.profile import HardwareProfile
from perf_specs import default_spec_and_profile
from moelens_cli import bench_validate as bench
from moelens_cli import bench_validate_report as report
from moelens_cli.bench_validate_calibrate import calibration_shapes, fit_prefill_attention
from services.coordinator.perf_model import Deployment


# Grid ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quick", [False, True])
def test_grid_spans_the_issue_ranges(quick):
    grid = bench.build_grid(quick)
    seqs = bench.MAX_NUM_SEQS
    if not quick:
        assert len(grid) >= 12
        assert min(p.prompt_len for p in grid) == 32 and max(p.prompt_len for p in grid) == 512
        assert min(p.gen_len for p in grid) == 16 and max(p.gen_len for p in grid) == 256
        assert min(p.num_requests for p in grid) < 100 <= max(p.num_requests for p in grid)
    regimes = [p.is_capacity_bound(seqs) for p in grid]
    assert any(regimes) and not all(regimes)
    for point in grid:  # every request fits the cache on its own
        assert point.prompt_len + point.gen_len <= point.kv_tokens


def test_capacity_bound_means_kv_below_the_running_demand():
    point = bench.GridPoint(128, 64, 48, 2048)
    assert point.kv_demand_tokens(24) == 24 * 191
    assert point.is_capacity_bound(24)
    assert not bench.GridPoint(128, 64, 48, 8192).is_capacity_bound(24)
    assert bench.GridPoint(128, 64, 4, 2048).kv_demand_tokens(24) == 4 * 191


def test_grid_is_grouped_by_kv_size_once_each():
    grid = bench.build_grid(False)
    groups = bench.group_by_kv(grid)
    sizes = [kv for kv, _ in groups]
    assert len(sizes) == len(set(sizes)) == 3
    assert sum(len(points) for _, points in groups) == len(grid)
    assert all(p.kv_tokens == kv for kv, points in groups for p in points)


# Accuracy and summary --------------------------------------------------------------------------

def _result(pred: float, meas: float, **extra) -> report.PointResult:
    return report.PointResult(prompt_len=32, gen_len=16, num_requests=10, kv_cache_gb=0.125,
                              predicted_tokens_per_s=pred, measured_tokens_per_s=meas,
                              bottleneck="gemm", **extra)


def test_accuracy_is_one_minus_relative_error():
    assert report.accuracy(100.0, 100.0) == 1.0
    assert report.accuracy(90.0, 100.0) == pytest.approx(0.9)
    assert report.accuracy(110.0, 100.0) == pytest.approx(0.9)
    assert report.accuracy(300.0, 100.0) == pytest.approx(-1.0)  # no floor at zero
    with pytest.raises(ValueError, match="measured"):
        report.accuracy(1.0, 0.0)


def test_summary_mean_and_worst():
    results = [_result(100, 100), _result(95, 100), _result(80, 100)]
    mean, worst = report.summary(results)
    assert mean == pytest.approx((1 + 0.95 + 0.8) / 3)
    assert worst == pytest.approx(0.8)
    with pytest.raises(ValueError):
        report.summary([])


def test_json_payload_schema(tmp_path):
    results = [_result(100, 110, wall_s=2.0, load_average=1.5,
                       predicted_components_s={"gemm": 1.0}),
               _result(50, 40)]
    path = tmp_path / "v.json"
    path.write_text(json.dumps(report.payload(results)))
    saved = json.loads(path.read_text())
    assert set(saved) >= {"points", "mean_accuracy", "worst_accuracy"}
    assert [list(p) for p in saved["points"]] == [list(report.POINT_KEYS)] * 2
    first = saved["points"][0]
    assert first["accuracy"] == pytest.approx(1 - 10 / 110)
    assert first["bottleneck"] == "gemm" and first["kv_cache_gb"] == 0.125
    assert saved["worst_accuracy"] == pytest.approx(1 - 10 / 40)
    assert saved["mean_accuracy"] == pytest.approx((2 - 10 / 110 - 10 / 40) / 2)
    assert saved["diagnostics"][0]["predicted_components_s"] == {"gemm": 1.0}


def test_table_lines_name_every_point():
    results = [_result(100, 110, load_average=3.2), _result(50, 40, is_capacity_bound=True)]
    rows = [report.format_row(r) for r in results]
    assert "compute" in rows[0] and "capacity" in rows[1] and "90.9%" in rows[0]
    assert "mean accuracy" in report.format_summary(results)


# Profile combination and calibration fit ---------------------------------------------------------

def _profile(a: float, b: float, xf: float = 1e-3, curve=((), ())) -> HardwareProfile:
    return HardwareProfile(io_bandwidth_bytes_per_s=1e9, gemm_intercept_s=a,
                           gemm_slope_s_per_token=b, attention_kv_bytes_per_s=2e9,
                           host_memory_bandwidth_bytes_per_s=8e9, exchange_fixed_s=xf,
                           exchange_s_per_byte=1e-9, is_accelerator_separate=False,
                           gemm_layer_flops_per_token=1e6, gemm_layer_weight_bytes=1e6,
                           gemm_curve_tokens=curve[0], gemm_curve_s=curve[1])


def test_median_profile_takes_the_line_through_median_end_times():
    profiles = [_profile(0.010, 1e-4), _profile(0.030, 3e-4, xf=5e-3), _profile(0.012, 1.2e-4)]
    mid = bench.median_profile(profiles)
    lo, hi = bench.LINE_ENDS
    assert mid.gemm_intercept_s + mid.gemm_slope_s_per_token * lo == pytest.approx(0.012 + 1.2e-4 * lo)
    assert mid.gemm_intercept_s + mid.gemm_slope_s_per_token * hi == pytest.approx(0.012 + 1.2e-4 * hi)
    assert mid.exchange_fixed_s == pytest.approx(1e-3)


def test_median_profile_takes_each_curve_point_at_its_median():
    curves = [((1, 32), (1e-3, 4e-3)), ((1, 32), (3e-3, 2e-3)), ((1, 32), (2e-3, 9e-3))]
    mid = bench.median_profile([_profile(0.01, 1e-4, curve=c) for c in curves])
    assert mid.gemm_curve_tokens == (1, 32) and mid.gemm_curve_s == pytest.approx((2e-3, 4e-3))
    mixed = bench.median_profile([_profile(0.01, 1e-4, curve=c)
                                  for c in (curves[0], ((1, 64), (1e-3, 4e-3)))])
    assert mixed.gemm_curve_tokens == () and mixed.gemm_curve_s == ()


def test_prefill_attention_fit_recovers_a_known_line():
    shapes = [(8, 1), (8, 24), (128, 8), (512, 2)]
    q_size, truth = 256, (5e-4, 2e-6, 3e-10)

    def seconds(per_seq, per_token, per_flop):
        return [per_seq * c + per_token * c * n + per_flop * 2 * q_size * c * n * n
                for n, c in shapes]

    assert fit_prefill_attention(shapes, seconds(*truth), q_size) == pytest.approx(truth)
    # a fit that would need a negative per-sequence cost refits without it
    call, token, flop = fit_prefill_attention(shapes, seconds(-1e-4, 2e-6, 3e-10), q_size)
    assert call == 0.0 and token >= 0 and flop > 0


# CLI ---------------------------------------------------------------------------------------------

def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_defaults_and_errors(capsys):
    args = _args()
    assert args.model == "default" and not args.quick and args.json is None
    assert args.max_num_seqs == bench.MAX_NUM_SEQS and args.token_budget == bench.TOKEN_BUDGET
    assert bench.run(_args("--max-num-seqs", "1")) == 2
    assert "--max-num-seqs" in capsys.readouterr().err
    assert bench.run(_args("--warmups", "0")) == 2
    assert "--warmups" in capsys.readouterr().err
    assert args.runs == 3 and bench.run(_args("--runs", "0")) == 2
    assert "--runs" in capsys.readouterr().err
    assert bench.run(_args("--model", "/nonexistent")) == 2
    assert "config.json" in capsys.readouterr().err


def test_calibration_prefills_fill_the_token_budget_within_the_context():
    deployment = Deployment(kv_cache_bytes=1 << 30, token_budget=1024, max_num_seqs=256)
    assert calibration_shapes(deployment) == [
        (8, 64, 1), (8, 64, 256), (1024, 1, 6), (512, 1, 12), (256, 1, 24), (8, 4, 1024)]
    assert [p for p, _, _ in calibration_shapes(deployment, max_prompt_len=511)][2:5] == \
        [511, 255, 127]
    bare = Deployment(kv_cache_bytes=1 << 30)  # no budget, no running cap: 512 tokens, 24 seqs
    assert calibration_shapes(bare)[1:3] == [(8, 64, 24), (512, 1, 6)]
    big = Deployment(kv_cache_bytes=1 << 30, token_budget=8192, max_num_seqs=256)
    assert calibration_shapes(big)[2:5] == [(1024, 1, 48), (512, 1, 96), (256, 1, 192)]
    odd = Deployment(kv_cache_bytes=1 << 30, token_budget=1289, max_num_seqs=256)
    assert calibration_shapes(odd)[2:5] == [(644, 1, 12), (322, 1, 24), (161, 1, 48)]


def test_fit_overheads_recovers_the_system_it_was_measured_on():
    """Calibration jobs whose phases and wall times are what a known set of StepOverheads prices
    (the in-situ GEMM and exchange scales, the paged attention's costs per call, row and token,
    the prefill attention and the per-step costs): the fit gives that set back."""
    from dataclasses import replace

    from moelens_cli.bench_validate_calibrate import (ATTENTION_TERMS, STEP_TERMS,
                                                      CalibrationJob, fit_overheads)
    from services.coordinator.perf_model import StepOverheads, Workload, predict
    spec, profile = default_spec_and_profile()
    deployment = Deployment(kv_cache_bytes=2 ** 26, block_size=16, token_budget=512,
                            max_num_seqs=24)
    truth = StepOverheads(step_fixed_s=4e-3, step_s_per_seq=3e-4, request_s=2e-3,
                          prefill_attention_s_per_seq=2e-4, prefill_attention_s_per_token=1e-6,
                          prefill_attention_s_per_flop=2e-11, gemm_layer_s=2e-4,
                          gemm_scale=1.3, exchange_fixed_scale=2.0,
                          exchange_byte_scale=1.5, attention_s_per_layer=1e-4,
                          attention_s_per_row=2e-5, attention_s_per_token=1e-6)
    jobs = []
    for p, g, k in calibration_shapes(deployment):
        run = predict(spec, profile, Workload(p, g, k), deployment, truth,
                      replay=True).stage2_scheduled
        jobs.append(CalibrationJob(run.total_time_s, run.num_iterations, dict(run.components_s)))
    fitted = fit_overheads(jobs, 1, spec, profile, deployment)
    for name in ("gemm_layer_s", "gemm_scale", "exchange_fixed_scale",
                 "exchange_byte_scale", *ATTENTION_TERMS,
                 *STEP_TERMS):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3), name
    assert fitted.prefill_attention_s_per_seq == pytest.approx(2e-4, rel=1e-3)
    bare = fit_overheads([replace(j, phase_s={}) for j in jobs], 1, spec, profile, deployment)
    assert bare.gemm_layer_s == 0.0
    assert bare.gemm_scale == bare.exchange_fixed_scale == 1.0
    assert bare.attention_s_per_layer == bare.attention_s_per_row == 0.0


def test_reprice_refits_a_stored_run_and_gives_its_prediction_back(tmp_path):
    """A stored point (spec, deployment, two calibration runs that a known StepOverheads
    prices, measured = that set's prediction of the job) priced again from its JSON document:
    the same prediction and accuracy 1; a document without calibration jobs is refused."""
    from dataclasses import asdict, replace

    from moelens_cli.bench_validate_calibrate import CalibrationJob
    from services.coordinator.perf_model import StepOverheads, Workload, predict
    spec, profile = default_spec_and_profile()
    deployment = Deployment(kv_cache_bytes=2 ** 26, block_size=16, token_budget=512,
                            max_num_seqs=24)
    truth = StepOverheads(step_fixed_s=2e-3, step_s_per_seq=1e-4, request_s=1e-3,
                          gemm_layer_s=1e-4, gemm_scale=1.2,
                          exchange_fixed_scale=1.5)

    def job(p: int, g: int, k: int):
        return predict(spec, profile, Workload(p, g, k), deployment, truth,
                       replay=True).stage2_scheduled

    runs = [[asdict(CalibrationJob(r.total_time_s, r.num_iterations, dict(r.components_s)))
             for r in (job(*shape) for shape in calibration_shapes(deployment))]] * 2
    measured = job(128, 64, 48).total_tokens_per_s
    stored = _result(0.0, measured, spec=asdict(spec), deployment=asdict(deployment),
                     calibration_runs=runs, profile=profile.to_dict())
    stored = replace(stored, prompt_len=128, gen_len=64, num_requests=48)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(report.payload([stored])))
    [priced] = bench.reprice(str(path))
    assert priced.predicted_tokens_per_s == pytest.approx(measured, rel=1e-3)
    assert priced.accuracy == pytest.approx(1.0, abs=1e-3)
    assert priced.overheads["exchange_fixed_scale"] == pytest.approx(1.5, rel=1e-3)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(report.payload([_result(1.0, 1.0)])))
    with pytest.raises(ValueError, match="no calibration jobs"):
        bench.reprice(str(old))
