"""`moe-lens bench throughput`: offline throughput in vLLM's format, beside the roofline and the
performance model's prediction.

Every request is submitted at once (random prompt ids, seeded; greedy; ignore EOS; exactly
gen-len tokens each), and the clock runs from the first submission to the last completion.
Just before the job, with the services idle, and again after it, the same process measures the
machine's fp32 GEMM rates on the model's shapes (the roofline: the faster of the two per kind)
and, before it, unless --profile is given, the hardware profile the prediction runs on. That
prediction prices kernels only; `--calibrate` adds the one `bench validate` makes: the services'
warmup profile and the step overheads of six short calibration jobs run just before
(coordinator Python, RPCs, sampling, the in-situ GEMM slowdown; the expert and attention
services' addresses the coordinator reports must be reachable from here).
Without --coordinator the services are started here (with /metrics on, so the job's step timings
can be read back) and stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from moelens.config import ModelConfig, load_config
from moelens.service_args import default_num_threads
from moelens_client import AsyncClient, Client, MoeLensError, ModelInfo, ServerInfo
from moelens_cli import bench_common as common
from moelens_cli import bench_steps
from moelens_cli.launch_options import add_launch_arguments, options_from_args
from moelens_cli.launcher import ServiceStartError, sigterm_as_interrupt, start_local_services

_READY_TIMEOUT_S = 60.0
_SETTLE_TRIES, _SETTLE_S = 20, 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="checkpoint folder, 'default', or a preset name such as "
                             "bench-mixtral (built once into the user cache)")
    parser.add_argument("--workload", default="fixed", choices=list(common.WORKLOADS),
                        help="fixed lengths, or a synthetic length distribution")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="prompt tokens (fixed: default 128; others: the mean)")
    parser.add_argument("--gen-len", type=int, default=None,
                        help="generated tokens (fixed: default 64; others: the mean)")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seeds prompt ids and lengths")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--coordinator", default=None,
                        help="host:port of running services (default: start them here)")
    parser.add_argument("--metrics-url", default=None,
                        help="the coordinator's /metrics URL, for step timings with "
                             "--coordinator (set automatically otherwise)")
    parser.add_argument("--profile", default=None,
                        help="hardware profile JSON for the prediction (default: measure it "
                             "now with moelens.profiler)")
    parser.add_argument("--quick-profile", action="store_true",
                        help="measure the profile with the profiler's quick settings")
    parser.add_argument("--roofline-rows", type=int, default=4096,
                        help="M of the roofline GEMMs (large: the best rate torch reaches)")
    parser.add_argument("--no-roofline", action="store_true", help="skip roofline and prediction")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--calibrate", action="store_true",
                        help="also predict as `bench validate` does (warmup profiles + step "
                             "overheads from 6 calibration jobs run just before; needs the "
                             "services' /metrics: started here, or --metrics-url)")
    add_launch_arguments(parser)


@dataclasses.dataclass
class Setup:
    """What is known before the job starts."""

    model_info: ModelInfo
    server_info: ServerInfo
    cfg: ModelConfig | None
    requests: list[common.BenchRequest]
    threads: int
    rates: common.GemmRates | None = None
    profile_source: str = ""
    prediction: Any = None
    calibrated: Any = None
    """The Prediction of --calibrate (services' warmup profile, measured step overheads)."""
    calibrated_overheads: Any = None
    """The StepOverheads it was priced with."""


def _local_config(model_info: ModelInfo, args: argparse.Namespace) -> ModelConfig | None:
    """The model's config when its folder is readable here (a remote coordinator's may not be)."""
    for folder in (model_info.model_path, args.model):
        if folder and (Path(folder) / "config.json").is_file():
            return load_config(folder)
    return None


def _predict(cfg: ModelConfig, setup: Setup, args: argparse.Namespace) -> tuple[Any, str]:
    from moelens.profile import load_profile
    from moelens.profiler import profile_local
    from services.coordinator.perf_model import (Deployment, ModelSpec, Workload, dtype_bytes,
                                                 predict)
    if args.profile:
        profile, source = load_profile(args.profile), f"loaded from {args.profile}"
    else:
        from services.attention_cpu import kernel
        torch.set_num_threads(setup.threads)
        profile = profile_local(cfg, quick=args.quick_profile,
                                dtype=getattr(torch, setup.model_info.dtype or "float32"),
                                attention_kernel=kernel.paged_attention,
                                kv_dtype=getattr(torch, args.kv_dtype or "float32"))
        source = (f"measured now by moelens.profiler ({'quick, ' if args.quick_profile else ''}"
                  f"{setup.threads} threads, native attention kernel)")
    kv_bytes = dtype_bytes(args.kv_dtype or "float32")
    spec = ModelSpec.from_config(cfg, weight_bytes=dtype_bytes(setup.model_info.dtype or
                                                               "float32"), kv_bytes=kv_bytes)
    info = setup.server_info
    gib = None if args.device_memory_gb is None else int(args.device_memory_gb * 2 ** 30)
    deployment = Deployment(
        kv_cache_bytes=info.num_kv_blocks * info.block_size * spec.kv_bytes_per_token,
        block_size=info.block_size, device_memory_bytes=gib,
        max_num_tokens=max(1, info.token_budget))
    workload = Workload.from_pairs([(len(r.prompt_ids), r.gen_len) for r in setup.requests])
    return predict(spec, profile, workload, deployment), source


def prepare(client: Client, args: argparse.Namespace, metrics_url: str | None = None) -> Setup:
    model_info, server_info = client.model_info(), client.server_info()
    cfg = _local_config(model_info, args)
    requests = common.make_requests(args.workload, args.num_requests, model_info.vocab_size,
                                    args.seed, args.prompt_len, args.gen_len,
                                    model_info.max_model_len or None)
    threads = args.expert_threads or default_num_threads()
    setup = Setup(model_info, server_info, cfg, requests, threads)
    if cfg is None:
        print(f"moe-lens bench: no roofline or prediction: {model_info.model_path} is not "
              "readable here (pass --model with a local copy)", file=sys.stderr)
    elif not args.no_roofline:
        print("moe-lens bench: measuring GEMM roofline and profile...", file=sys.stderr,
              flush=True)
        setup.rates = common.measure_gemm_rates(cfg, threads, rows=args.roofline_rows,
                                                dtype=model_info.dtype or "float32")
        try:
            setup.prediction, setup.profile_source = _predict(cfg, setup, args)
        except (ValueError, OSError) as err:  # the job is still worth running without it
            print(f"moe-lens bench: no prediction: {err}", file=sys.stderr)
    if cfg is not None and args.calibrate:
        setup.calibrated, setup.calibrated_overheads = _calibrate(client, cfg, setup, args,
                                                                  metrics_url)
    return setup


def _calibrate(client: Client, cfg: ModelConfig, setup: Setup, args: argparse.Namespace,
               metrics_url: str | None) -> Any:
    from moelens_cli.bench_validate import calibrated_prediction
    from services.coordinator.perf_model import Workload
    from services.coordinator.scheduler import SchedulerConfig
    print("moe-lens bench: calibrating the prediction (warmups, short calibration jobs)...",
          file=sys.stderr, flush=True)
    workload = Workload.from_pairs([(len(r.prompt_ids), r.gen_len) for r in setup.requests])
    max_num_seqs = args.max_num_seqs or SchedulerConfig().max_num_seqs
    return calibrated_prediction(client, metrics_url, cfg, workload, max_num_seqs,
                                 seed=args.seed + 1)


async def _run_job(address: str, requests: list[common.BenchRequest],
                   progress: bool) -> tuple[list[int], float]:
    """Output token counts per request and the wall time, all submitted at once."""
    async with AsyncClient(address) as client:
        start = time.perf_counter()
        results = await client.generate_batch(
            [r.prompt_ids for r in requests],
            overrides=[{"max_tokens": r.gen_len, "min_tokens": r.gen_len} for r in requests],
            max_concurrency=len(requests), progress=progress, detokenize=False,
            temperature=0.0, ignore_eos=True)
        elapsed = time.perf_counter() - start
    return [len(r.token_ids) for r in results], elapsed


def _scrape(url: str | None, num_steps: int | None = None) -> dict[str, float] | None:
    """The step series; with num_steps, waits (briefly, bounded) until the exporter has seen
    that many steps: the engine streams a request's last token before it records the step."""
    if not url:
        return None
    try:
        for _ in range(_SETTLE_TRIES):
            values = bench_steps.scrape_step_metrics(url)
            seen = values.get("moelens_step_duration_seconds_count", 0)
            if num_steps is None or seen >= num_steps:
                break
            time.sleep(_SETTLE_S)
        return values
    except OSError as err:
        print(f"moe-lens bench: no step timings ({url}: {err})", file=sys.stderr)
        return None


def report(args: argparse.Namespace, setup: Setup, result: common.ThroughputResult,
           steps: bench_steps.StepSummary | None) -> dict[str, Any]:
    """Print the vLLM line and what explains it; return the JSON payload."""
    print(common.format_throughput(result))
    payload: dict[str, Any] = {
        "requests_per_s": result.requests_per_s, "total_tokens_per_s": result.total_tokens_per_s,
        "output_tokens_per_s": result.output_tokens_per_s, "elapsed_s": result.elapsed_s,
        "num_requests": result.num_requests, "num_prompt_tokens": result.num_prompt_tokens,
        "num_output_tokens": result.num_output_tokens, "roofline_fraction": None,
        "predicted_output_tokens_per_s": None, "config": _config(args, setup)}
    if setup.rates is not None and setup.cfg is not None:
        pairs = [(len(r.prompt_ids), r.gen_len) for r in setup.requests]
        flops = common.job_gemm_flops(setup.cfg, pairs)
        line = common.roofline(flops, setup.rates)
        fraction = line.fraction(result.elapsed_s)
        print(f"Roofline: {line.gemm_flops / 1e12:.3f} TFLOP of GEMMs at "
              f"{line.peak_flops_per_s / 1e9:.1f} GFLOP/s ({setup.rates.dtype}, "
              f"{setup.rates.threads} threads, "
              f"best of before and after the job) = {line.min_time_s:.2f} s minimum; measured "
              f"{result.elapsed_s:.2f} s -> {100 * fraction:.1f}% of roofline")
        payload.update(roofline_fraction=fraction, roofline_min_time_s=line.min_time_s,
                       gemm_flops=flops.by_kind, gemm_flops_per_s=setup.rates.flops_per_s)
    if setup.prediction is not None:
        payload.update(_prediction(
            "Prediction", setup.prediction.stage2, setup.prediction.bottleneck, result,
            f"profile {setup.profile_source}"), profile_source=setup.profile_source)
    if setup.calibrated is not None:
        scheduled = setup.calibrated.stage2_scheduled
        kernels_only = payload["predicted_output_tokens_per_s"]
        payload.update(_prediction(
            "Calibrated prediction", scheduled, scheduled.bottleneck, result,
            "services' warmup profile + step overheads of calibration jobs (as bench validate)"),
            kernels_only_predicted_output_tokens_per_s=kernels_only, calibrated_prediction=True,
            calibrated_components_s=dict(scheduled.components_s),
            calibrated_overheads=vars(setup.calibrated_overheads))
        print("  predicted seconds: " + ", ".join(
            f"{name} {seconds:.2f}" for name, seconds in scheduled.components_s.items()))
    if steps is not None:
        print(bench_steps.format_steps(steps, result.elapsed_s))
        payload["step_timings"] = dataclasses.asdict(steps)
    return payload


def _prediction(label: str, run: Any, bottleneck: str, result: common.ThroughputResult,
                source: str) -> dict[str, Any]:
    """Print one prediction (a perf_model Stage2Prediction) beside the measurement; its JSON
    fields."""
    ratio = result.output_tokens_per_s / run.output_tokens_per_s
    print(f"{label}: {run.output_tokens_per_s:.2f} output tokens/s, {run.total_tokens_per_s:.2f} "
          f"total tokens/s, {run.total_time_s:.2f} s, {run.num_iterations:.0f} iterations "
          f"(bottleneck {bottleneck}); measured/predicted = {ratio:.2f}; {source}")
    return dict(predicted_output_tokens_per_s=run.output_tokens_per_s,
                predicted_total_tokens_per_s=run.total_tokens_per_s,
                predicted_bottleneck=bottleneck, predicted_iterations=run.num_iterations)


def _config(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    info = setup.server_info
    return {"model": setup.model_info.model_path, "workload": args.workload,
            "prompt_len": args.prompt_len, "gen_len": args.gen_len,
            "mean_prompt_len": sum(len(r.prompt_ids) for r in setup.requests)
            / len(setup.requests),
            "mean_gen_len": sum(r.gen_len for r in setup.requests) / len(setup.requests),
            "num_requests": args.num_requests, "seed": args.seed, "threads": setup.threads,
            "coordinator": args.coordinator, "token_budget": info.token_budget,
            "num_kv_blocks": info.num_kv_blocks, "block_size": info.block_size,
            "device": info.device, "transport": info.transport, "pipeline": info.pipeline,
            "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if not k.startswith("_") and not callable(v)}}


def _check(args: argparse.Namespace) -> None:
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.roofline_rows < 1:
        raise ValueError(f"--roofline-rows must be >= 1, got {args.roofline_rows}")
    if args.calibrate and args.coordinator and not args.metrics_url:
        raise ValueError("--calibrate reads the coordinator's step timers: pass --metrics-url "
                         "with --coordinator")
    if args.workload == "fixed":
        args.prompt_len = 128 if args.prompt_len is None else args.prompt_len
        args.gen_len = 64 if args.gen_len is None else args.gen_len


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
        metrics_url = args.metrics_url
        options = None
        if not args.coordinator:
            port = common.free_port_run(3)
            options = options_from_args(args, model=common.resolve_bench_model(args.model),
                                        metrics_port=port)
            metrics_url = f"http://127.0.0.1:{port}/metrics"
    except (ValueError, OSError) as err:
        print(f"moe-lens bench throughput: {err}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            address = args.coordinator
            if options is not None:
                print("moe-lens bench: starting services...", file=sys.stderr, flush=True)
                address = stack.enter_context(start_local_services(options)).coordinator_address
            client = stack.enter_context(Client(address))
            client.wait_ready(_READY_TIMEOUT_S)
            setup = prepare(client, args, metrics_url)
            before, jiffies = _scrape(metrics_url), common.cpu_jiffies()
            counts, elapsed = asyncio.run(_run_job(address, setup.requests,
                                                   not args.no_progress))
            steal = common.steal_fraction(jiffies, common.cpu_jiffies())
            after = _scrape(metrics_url, client.server_info().num_steps)
        if setup.rates is not None and setup.cfg is not None:  # services stopped: idle cores
            print("moe-lens bench: measuring the GEMM roofline again...", file=sys.stderr,
                  flush=True)
            setup.rates = setup.rates.best(common.measure_gemm_rates(
                setup.cfg, setup.rates.threads, rows=args.roofline_rows,
                dtype=setup.rates.dtype))
    except KeyboardInterrupt:
        print("moe-lens bench throughput: interrupted; services stopped", file=sys.stderr)
        return 130
    except (MoeLensError, ServiceStartError, ValueError) as err:
        print(f"moe-lens bench throughput: {err}", file=sys.stderr)
        return 1
    result = common.ThroughputResult(len(counts), sum(len(r.prompt_ids) for r in setup.requests),
                                     sum(counts), elapsed)
    steps = bench_steps.summarize_steps(before, after) if before and after else None
    payload = report(args, setup, result, steps)
    if steal is not None:
        print(f"CPU steal during the job: {100 * steal:.1f}% of the CPUs' time (the host ran "
              f"other work on them)")
        payload["cpu_steal_fraction"] = steal
    if args.json:
        common.write_json(args.json, payload)
    return 0
