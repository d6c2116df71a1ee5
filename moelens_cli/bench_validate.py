"""`moe-lens bench validate`: the performance model's prediction against the running system.

For each configuration of a fixed grid (prompt 32…512, generation 16…256, jobs of tens to
hundreds of requests, KV caches that bind and ones that do not) the services are started (once
per KV size: it is a start flag), and then, point by point:

1. the environment is measured: the services re-measure their hardware profile (the expert's
   Warmup RPC, which re-runs the attention service's, `--warmups` times) and six calibration
   jobs run (bench_validate_calibrate; never the point's own job);
2. the job runs: every request submitted at once, random prompt ids, greedy, ignore_eos,
   min_tokens = max_tokens = gen_len; measured T = (prompt + generated tokens) / wall time;
3. the environment is measured again, so the measurements bracket the job in time (the machine
   is shared and its load drifts); the profile is the median of both sets of warmups, the
   StepOverheads are fitted to both calibration runs merged;
4. the model predicts the job's total tokens/s from that profile, those overheads and the
   deployment the services report (KV blocks, block size, the coordinator's token budget, the
   running-sequence cap), replaying the coordinator's scheduler (Prediction.stage2_scheduled).

accuracy = 1 − |predicted − measured| / measured, per point, then mean and worst.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace

import grpc
import numpy as np

from moelens.config import ModelConfig, load_config
from moelens.v1 import attention_pb2, attention_pb2_grpc, expert_pb2, expert_pb2_grpc
from moelens_cli import bench_common as common
from moelens_cli import bench_validate_report as report
from moelens_cli.bench_validate_calibrate import (CalibrationJob, fit_overheads,
                                                  merge_calibrations, run_calibration,
                                                  run_calibrations, scrape_settled,
                                                  scrape_steps)
from moelens_cli.launch_options import LaunchOptions
from moelens_cli.launcher import ServiceStartError, sigterm_as_interrupt, start_local_services

MAX_NUM_SEQS = 24
"""Running-request cap the services are started with: the grid's KV sizes make its points
capacity- or compute-bound at this cap (GridPoint.is_capacity_bound), and every run since the
first used it, so runs compare."""
TOKEN_BUDGET = 512
"""Tokens per iteration, fixed so that runs compare: inside the range the expert service's
warmup times its GEMM line on (32…1024 tokens), so no iteration extrapolates the line."""
_READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GridPoint:
    prompt_len: int
    gen_len: int
    num_requests: int
    kv_tokens: int
    """KV capacity the services start with, in tokens (converted to --kv-cache-gb per model)."""

    def kv_demand_tokens(self, max_num_seqs: int) -> int:
        """KV the job could hold at once: its running cap of requests at full length."""
        return min(self.num_requests, max_num_seqs) * (self.prompt_len + self.gen_len - 1)

    def is_capacity_bound(self, max_num_seqs: int) -> bool:
        return self.kv_tokens < self.kv_demand_tokens(max_num_seqs)


AMPLE, MEDIUM, TIGHT = 65536, 8192, 2048
FULL_GRID = (
    GridPoint(32, 16, 200, AMPLE), GridPoint(128, 64, 48, AMPLE), GridPoint(512, 32, 24, AMPLE),
    GridPoint(256, 128, 24, AMPLE), GridPoint(64, 256, 16, AMPLE), GridPoint(128, 16, 300, AMPLE),
    GridPoint(32, 64, 100, MEDIUM), GridPoint(512, 64, 40, MEDIUM),
    GridPoint(128, 256, 40, MEDIUM),
    GridPoint(128, 64, 48, TIGHT), GridPoint(32, 128, 64, TIGHT), GridPoint(256, 32, 32, TIGHT),
)
QUICK_GRID = (
    GridPoint(32, 16, 48, AMPLE), GridPoint(128, 32, 24, AMPLE), GridPoint(512, 16, 8, AMPLE),
    GridPoint(128, 64, 24, TIGHT), GridPoint(32, 128, 24, TIGHT), GridPoint(256, 32, 16, TIGHT),
)


def parse_point(text: str) -> GridPoint:
    """--point P,G,K,KV: prompt tokens, generated tokens, requests, KV capacity in tokens."""
    try:
        p, g, k, kv = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--point {text!r}: give PROMPT,GEN,REQUESTS,KV_TOKENS, e.g. "
                         "128,64,48,2048") from None
    if min(p, g, k) < 1 or kv < p + g:
        raise ValueError(f"--point {text!r}: lengths and requests must be >= 1 and the KV "
                         f"capacity must hold one request (>= {p + g} tokens)")
    return GridPoint(p, g, k, kv)


def build_grid(quick: bool, points: list[GridPoint] | None = None,
               repeat: int = 1) -> list[GridPoint]:
    """The configurations (`points`, else the quick or full grid), each `repeat` times in a row,
    grouped by KV size (one service start per size), largest first."""
    grid = points or (QUICK_GRID if quick else FULL_GRID)
    return sorted((p for p in grid for _ in range(repeat)), key=lambda p: -p.kv_tokens)


def group_by_kv(points: list[GridPoint]) -> list[tuple[int, list[GridPoint]]]:
    groups: dict[int, list[GridPoint]] = {}
    for point in points:
        groups.setdefault(point.kv_tokens, []).append(point)
    return list(groups.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="checkpoint folder or 'default' (the "
                        "built-in 20 M-parameter model: the grid is sized for it)")
    parser.add_argument("--json", metavar="PATH", help="write the points and accuracies here")
    parser.add_argument("--quick", action="store_true",
                        help="6 small points in 2 KV sizes (a smoke run of a few minutes)")
    parser.add_argument("--point", action="append", default=None, metavar="P,G,K,KV",
                        help="validate this configuration instead of the grid (prompt tokens, "
                             "generated tokens, requests, KV tokens); repeatable")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each point this many times in a row (shows the noise)")
    parser.add_argument("--runs", type=int, default=3,
                        help="job runs per point between its two environment measurements; "
                             "measured = the median run (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt ids")
    parser.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS,
                        help=f"running requests at most (default {MAX_NUM_SEQS}; see the module "
                             "docs for why not more)")
    parser.add_argument("--token-budget", type=int, default=TOKEN_BUDGET,
                        help="tokens per iteration, fixed so runs compare (0: the model's)")
    parser.add_argument("--warmups", type=int, default=7,
                        help="profile re-measurements before each point (each at its median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of each compute service (default: all cores)")
    parser.add_argument("--log-dir", default=None, help="keep service logs here")
    parser.add_argument("--reprice", metavar="PATH", default=None,
                        help="run nothing: price the points of an earlier --json document "
                             "again with this code's model, from the profiles and calibration "
                             "jobs it stored (what a model change would have predicted)")


def _stubs(services) -> tuple:
    expert = expert_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(services.expert_address))
    attention = attention_pb2_grpc.AttentionServiceStub(
        grpc.insecure_channel(services.attention_address))
    return expert, attention


LINE_ENDS = (32, 512)
"""Token counts at which median_profile takes the warmups' median GEMM times: the span of the
grid's iterations (at most TOKEN_BUDGET tokens)."""


def median_profile(profiles: list):
    """One profile from repeated warmups, each measurement at its median: the machine is shared,
    and the job that follows runs under the typical load, not the least-disturbed moment (the
    warmup already keeps the best of its own few repeats). The GEMM line goes through the
    median times at the two ends of its measured range, and the curve is each point's median
    (dropped if the warmups timed different counts)."""
    def mid(values) -> float:
        return float(statistics.median(values))

    def at(p, n: int) -> float:
        return p.gemm_intercept_s + p.gemm_slope_s_per_token * n

    lo, hi = LINE_ENDS
    t_lo, t_hi = mid(at(p, lo) for p in profiles), mid(at(p, hi) for p in profiles)
    slope = max((t_hi - t_lo) / (hi - lo), 1e-12)
    tokens = profiles[0].gemm_curve_tokens
    same = all(p.gemm_curve_tokens == tokens for p in profiles)
    curve = tuple(mid(p.gemm_curve_s[i] for p in profiles) for i in range(len(tokens)))
    return replace(
        profiles[0], gemm_slope_s_per_token=slope, gemm_intercept_s=max(0.0, t_lo - slope * lo),
        gemm_curve_tokens=tokens if same else (), gemm_curve_s=curve if same else (),
        **{name: mid(getattr(p, name) for p in profiles) for name in (
            "io_bandwidth_bytes_per_s", "attention_kv_bytes_per_s",
            "host_memory_bandwidth_bytes_per_s", "exchange_fixed_s", "exchange_s_per_byte")})


def _warm_profiles(cfg: ModelConfig, expert, attention, num_warmups: int) -> tuple[list, object]:
    """Re-measure the profile now, `num_warmups` times (the expert's Warmup also re-runs the
    attention service's); the profiles and a LiveLens built from their median."""
    from services.coordinator.lens import LiveLens, profile_from_services
    profiles = []
    for _ in range(num_warmups):
        expert.Warmup(expert_pb2.ExpertInfoRequest(), timeout=600)
        e = expert.Info(expert_pb2.ExpertInfoRequest(), timeout=30)
        a = attention.Info(attention_pb2.AttentionInfoRequest(), timeout=30)
        profiles.append(profile_from_services(cfg, e, a))
    return profiles, LiveLens.build(cfg, median_profile(profiles), e, a)


def calibrated_prediction(client, metrics_url: str, cfg: ModelConfig, workload,
                          max_num_seqs: int, warmups: int = 7, seed: int = 0):
    """What this command would predict for `workload` on the running services behind `client`:
    the median of `warmups` warmup profiles, StepOverheads fitted to calibration jobs A…F run
    now (bench_validate_calibrate), the scheduler replayed. One measurement before the job,
    where a validation point brackets its job with two. Returns the perf_model Prediction and
    the fitted StepOverheads."""
    from services.coordinator.perf_model import predict
    info = client.server_info()
    expert, attention = _stubs(info)  # ServerInfo names both addresses
    profiles, lens = _warm_profiles(cfg, expert, attention, warmups)
    deployment = replace(lens.deployment, token_budget=info.token_budget,
                         max_num_seqs=max_num_seqs)
    max_prompt_len = (client.model_info().max_model_len or 0) - 1
    max_prompt_len = max_prompt_len if max_prompt_len > 0 else None
    jobs = run_calibrations(client, metrics_url, deployment, cfg.vocab_size, seed,
                            max_prompt_len)
    overheads = fit_overheads(jobs, 1, lens.spec, lens.profile, deployment, max_prompt_len)
    return predict(lens.spec, lens.profile, workload, deployment, overheads,
                   replay=True), overheads


def _run_job(client, point: GridPoint, vocab_size: int, seed: int) -> float:
    """Wall seconds of the job, all requests at once; ValueError if any is short."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab_size, point.prompt_len).tolist()
               for _ in range(point.num_requests)]
    start = time.perf_counter()
    results = client.generate_batch(prompts, max_concurrency=point.num_requests, progress=False,
                                    temperature=0.0, ignore_eos=True, min_tokens=point.gen_len,
                                    max_tokens=point.gen_len)
    wall = time.perf_counter() - start
    short = [len(r.token_ids) for r in results if len(r.token_ids) != point.gen_len]
    if short:
        raise ValueError(f"{len(short)} requests returned {short[:3]} tokens, not "
                         f"{point.gen_len}")
    return wall


def _phases_since(url: str, before: dict[str, float], wall: float) -> dict[str, float]:
    """The job's expert-side phase seconds, the rest of its wall time as "overhead", and its
    iterations as "steps"."""
    after = scrape_settled(url)
    phases = {name: after.get(name, 0.0) - before.get(name, 0.0)
              for name in ("gemm", "prefill_attention", "attention", "exchange")}
    phases["overhead"] = wall - sum(phases.values())
    phases["steps"] = after.get("steps", 0.0) - before.get("steps", 0.0)
    return phases


def _measure_environment(ctx: dict, seed: int) -> tuple[list, list]:
    """Warmup profiles and calibration jobs, measured now."""
    args = ctx["args"]
    profiles, lens = _warm_profiles(ctx["cfg"], ctx["expert"], ctx["attention"], args.warmups)
    jobs = run_calibrations(ctx["client"], ctx["metrics_url"], ctx["deployment"](lens),
                            ctx["cfg"].vocab_size, seed)
    return profiles, jobs


def _median_run(ctx: dict, point: GridPoint, seed: int) -> tuple[float, dict[str, float],
                                                                list[float], float | None]:
    """The job run `--runs` times: (the median run's wall seconds, phases and CPU steal, every
    run's wall)."""
    runs = []
    for _ in range(ctx["args"].runs):
        before, jiffies = scrape_steps(ctx["metrics_url"]), common.cpu_jiffies()
        wall = _run_job(ctx["client"], point, ctx["cfg"].vocab_size, seed)
        steal = common.steal_fraction(jiffies, common.cpu_jiffies())
        runs.append((wall, _phases_since(ctx["metrics_url"], before, wall), steal))
    walls = [run[0] for run in runs]
    wall, phases, steal = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    return wall, phases, walls, steal


def _measure_point(ctx: dict, point: GridPoint, index: int) -> report.PointResult:
    """Environment before, the job (`--runs` times), environment after; predict from both
    measurements."""
    args, client = ctx["args"], ctx["client"]
    load_before = os.getloadavg()[0]
    preempted_before = client.server_info().num_preemptions
    profiles, jobs = _measure_environment(ctx, args.seed + 1000 + index)
    wall, measured_phases, walls, steal = _median_run(ctx, point, args.seed + index)
    preempted = round((client.server_info().num_preemptions - preempted_before) / args.runs)
    more_profiles, more_jobs = _measure_environment(ctx, args.seed + 2000 + index)
    profile = median_profile(profiles + more_profiles)
    lens = ctx["lens"](profile)
    result = report.PointResult(
        prompt_len=point.prompt_len, gen_len=point.gen_len, num_requests=point.num_requests,
        kv_cache_gb=ctx["kv_gb"], predicted_tokens_per_s=0.0,
        measured_tokens_per_s=point.num_requests * (point.prompt_len + point.gen_len) / wall,
        bottleneck="", wall_s=wall, run_walls_s=walls, measured_preemptions=preempted,
        load_average=(load_before + os.getloadavg()[0]) / 2, cpu_steal_fraction=steal,
        is_capacity_bound=point.is_capacity_bound(args.max_num_seqs),
        measured_phases_s=measured_phases, spec=asdict(lens.spec),
        deployment=asdict(ctx["deployment"](lens)),
        calibration_runs=[[asdict(job) for job in run] for run in (jobs, more_jobs)])
    return price_point(result, profile)


def price_point(result: report.PointResult, profile) -> report.PointResult:
    """`result` with the model's prediction filled in: StepOverheads fitted to its calibration
    runs (merged), the job priced on `profile` and its deployment by the scheduler replay."""
    from services.coordinator.perf_model import Deployment, ModelSpec, Workload, predict
    spec = ModelSpec(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in result.spec.items()})
    deployment = Deployment(**result.deployment)
    runs = [[CalibrationJob(**job) for job in run] for run in result.calibration_runs]
    overheads = fit_overheads(merge_calibrations(runs), len(runs), spec, profile, deployment)
    workload = Workload(result.prompt_len, result.gen_len, result.num_requests)
    pred = predict(spec, profile, workload, deployment, overheads, replay=True)
    bare = predict(spec, profile, workload, deployment, replay=True)
    scheduled = pred.stage2_scheduled
    return replace(
        result, predicted_tokens_per_s=scheduled.total_tokens_per_s,
        bottleneck=scheduled.bottleneck,
        kernels_only_tokens_per_s=bare.stage2_scheduled.total_tokens_per_s,
        fluid_tokens_per_s=pred.stage2.total_tokens_per_s,
        predicted_iterations=scheduled.num_iterations,
        predicted_preemptions=scheduled.num_preemptions, profile=profile.to_dict(),
        overheads=vars(overheads), predicted_components_s=dict(scheduled.components_s))


def _run_group(args, cfg: ModelConfig, model: str, kv_tokens: int, points: list[GridPoint],
               first_index: int) -> list[report.PointResult]:
    from moelens_client import Client
    kv_gb = kv_tokens * cfg.kv_bytes_per_token(4) / 2 ** 30
    port = common.free_port_run(3)
    options = LaunchOptions(model=model, kv_cache_gb=kv_gb, token_budget=args.token_budget or None,
                            max_num_seqs=args.max_num_seqs, expert_threads=args.threads,
                            attention_threads=args.threads, metrics_port=port,
                            log_dir=args.log_dir, log_level="WARNING")
    print(f"moe-lens bench validate: starting services with {kv_tokens} KV tokens "
          f"({kv_gb * 1024:.1f} MiB)...", file=sys.stderr, flush=True)
    results = []
    with ExitStack() as stack:
        services = stack.enter_context(start_local_services(options))
        client = stack.enter_context(Client(services.coordinator_address))
        client.wait_ready(_READY_TIMEOUT_S)
        expert, attention = _stubs(services)
        # An untimed job first: the services' first steps allocate and page in what later ones
        # reuse, and the first point should not pay for it. As many requests at once as the
        # group's largest job: the gRPC servers start a handler thread per concurrent stream
        # the first time so many are open (the first run of 200 requests was ~25% slower).
        run_calibration(client, f"http://127.0.0.1:{port}/metrics", cfg.vocab_size,
                        max(args.max_num_seqs, *(p.num_requests for p in points)), 64, 16,
                        args.seed + 999)
        budget = client.server_info().token_budget
        ctx = dict(args=args, cfg=cfg, client=client, expert=expert, attention=attention,
                   metrics_url=f"http://127.0.0.1:{port}/metrics", kv_gb=kv_gb)
        first_lens = _warm_profiles(cfg, expert, attention, 1)[1]
        # Same spec and deployment for every profile: what the services report at start.
        ctx["lens"] = lambda profile: replace(first_lens, profile=profile)
        ctx["deployment"] = lambda lens: replace(lens.deployment, token_budget=budget,
                                                 max_num_seqs=args.max_num_seqs)
        for offset, point in enumerate(points):
            result = _measure_point(ctx, point, first_index + offset)
            print(report.format_row(result), flush=True)
            print(report.format_components(result), file=sys.stderr, flush=True)
            results.append(result)
    return results


def _check(args: argparse.Namespace) -> None:
    if args.max_num_seqs < 2:
        raise ValueError(f"--max-num-seqs must be >= 2 (two calibration sizes), got "
                         f"{args.max_num_seqs}")
    if args.token_budget < 0:
        raise ValueError(f"--token-budget must be >= 0 (0: the model's), got {args.token_budget}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    if args.warmups < 1:
        raise ValueError(f"--warmups must be >= 1, got {args.warmups}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def reprice(path: str) -> list[report.PointResult]:
    """The points of a stored run priced again (see --reprice)."""
    from moelens.profile import HardwareProfile
    with open(path) as source:
        results = report.from_payload(json.load(source))
    if not all(r.calibration_runs and r.spec and r.deployment for r in results):
        raise ValueError(f"{path} has no calibration jobs to refit (written before --reprice "
                         f"existed); run `moe-lens bench validate --json` again")
    return [price_point(r, HardwareProfile.from_dict(r.profile)) for r in results]


def _write(results: list[report.PointResult], json_path: str | None) -> None:
    print(report.format_summary(results))
    if json_path:
        with open(json_path, "w") as out:
            json.dump(report.payload(results), out, indent=2)
            out.write("\n")


def run(args: argparse.Namespace) -> int:
    from moelens.default_model import resolve_model
    if args.reprice:
        try:
            results = reprice(args.reprice)
        except (ValueError, OSError, TypeError) as err:
            print(f"moe-lens bench validate: --reprice {args.reprice}: {err}", file=sys.stderr)
            return 2
        print(report.HEADER)
        for result in results:
            print(report.format_row(result))
            print(report.format_components(result))
        _write(results, args.json)
        return 0
    try:
        _check(args)
        points = [parse_point(text) for text in args.point or []]
        model = str(resolve_model(args.model))
        cfg = load_config(model)
    except (ValueError, OSError) as err:
        print(f"moe-lens bench validate: {err}", file=sys.stderr)
        return 2
    results: list[report.PointResult] = []
    print(report.HEADER, flush=True)
    try:
        with sigterm_as_interrupt():
            for kv_tokens, group in group_by_kv(build_grid(args.quick, points, args.repeat)):
                results += _run_group(args, cfg, model, kv_tokens, group, len(results))
    except KeyboardInterrupt:
        print("moe-lens bench validate: interrupted; services stopped", file=sys.stderr)
        return 130
    except (ServiceStartError, ValueError, grpc.RpcError, OSError) as err:
        print(f"moe-lens bench validate: {err}", file=sys.stderr)
        return 1
    finally:
        if results:
            _write(results, args.json)
    return 0
