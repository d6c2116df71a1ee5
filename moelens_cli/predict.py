"""`moe-lens predict`: what throughput a job will get, and why, before running it (no services).

Reads the model's config.json and a hardware profile (from `moe-lens profile`), prints the
Stage 1 bound, the Stage 2 prediction for the finite job, the bottleneck and the turning point,
and optionally writes JSON and the throughput-vs-KV-capacity plot (the paper's Fig. 3b).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from moelens.config import load_config
from moelens.profile import load_profile
from services.coordinator.perf_model import (Deployment, ModelSpec, Prediction, Workload,
                                             dtype_bytes, place_weights, predict, stage1_bound,
                                             stage2_predict, token_budget, with_kv_bytes)

GIB = 2 ** 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder with the model's config.json")
    parser.add_argument("--profile", required=True, help="hardware profile JSON (moe-lens profile)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens per request (p)")
    parser.add_argument("--gen-len", type=int, help="generated tokens per request (g)")
    parser.add_argument("--num-requests", type=int, help="requests in the job (K)")
    parser.add_argument("--lengths", help="JSON file: a list of [prompt_len, gen_len] per request "
                                          "(instead of --prompt-len/--gen-len/--num-requests)")
    parser.add_argument("--kv-cache-gb", type=float, required=True,
                        help="host memory for the KV cache, GiB (attention service --kv-cache-gb)")
    parser.add_argument("--device-memory-gb", type=float, default=None,
                        help="device budget for weights + workspace, GiB (default: all resident)")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    parser.add_argument("--max-num-tokens", type=int, default=8192,
                        help="most tokens per step (the services' --max-num-tokens)")
    parser.add_argument("--dtype", default=None, help="weight dtype (default: the profile's)")
    parser.add_argument("--kv-dtype", default="float32", help="KV cache dtype")
    parser.add_argument("--plot", help="write throughput vs KV capacity to this PNG")
    parser.add_argument("--json", help="write the full prediction to this JSON file")


def _workload(args: argparse.Namespace) -> Workload:
    if args.lengths:
        pairs = json.loads(Path(args.lengths).read_text())
        return Workload.from_pairs([(int(p), int(g)) for p, g in pairs])
    missing = [f"--{n.replace('_', '-')}" for n in ("prompt_len", "gen_len", "num_requests")
               if getattr(args, n) is None]
    if missing:
        raise ValueError(f"set {', '.join(missing)} (or give --lengths FILE)")
    return Workload(args.prompt_len, args.gen_len, args.num_requests)


def _report(pred: Prediction, spec: ModelSpec, workload: Workload) -> str:
    s1, s2, pl = pred.stage1, pred.stage2, pred.placement
    lines = [
        f"job: {workload.num_requests} requests, p={workload.prompt_len}, g={workload.gen_len}"
        + (" (means of --lengths)" if workload.pairs else ""),
        f"weights: {pl.num_resident_layers}/{spec.num_layers} layers resident, "
        f"{pl.streamed_bytes / GIB:.2f} GiB streamed per iteration (delta = {s1.delta_s:.3f} s)",
        f"token budget n_real: {pred.n_real} tokens/iteration",
        f"KV capacity M: {s1.kv_capacity_tokens} tokens; PME = {s1.pme:.4g}",
        f"turning point M*: {s1.turning_point_tokens:.0f} tokens "
        f"({s1.turning_point_bytes / GIB:.2f} GiB of KV) -- "
        + ("KV below it: more KV raises throughput" if s1.kv_capacity_tokens
           < s1.turning_point_tokens else "KV above it: more KV adds nothing"),
        "",
        "Stage 1 (steady-state bound, prompt + generated tokens/s):",
        f"  Eq. 4 T_max = {s1.t_max:.1f}  (T_GPU = {s1.t_gpu:.1f})",
        f"  with attention, exchange, host memory: {s1.throughput:.1f}  "
        f"(bottleneck: {s1.bottleneck})",
        "Stage 2 (this job):",
        f"  total time {s2.total_time_s:.1f} s over {s2.num_iterations} iterations "
        f"(ramp-up {s2.ramp_up_s:.1f} s, steady {s2.steady_s:.1f} s, drain {s2.drain_s:.1f} s)",
        f"  output {s2.output_tokens_per_s:.1f} tok/s, total {s2.total_tokens_per_s:.1f} tok/s",
        f"  admits {s2.admitted_per_iteration:.2f} prompts/iteration, "
        f"{s2.tokens_per_steady_iteration:.0f} tokens/steady iteration, "
        f"KV fragmentation {100 * s2.kv_fragmentation:.1f}%",
        f"  host memory demand {pred.host_memory_demand_bytes_per_s / 1e9:.1f} GB/s"
        + (" (exceeds the host's bandwidth: streaming and attention stretch)"
           if pred.is_host_memory_contended else ""),
        f"bottleneck: {pred.bottleneck}",
    ]
    return "\n".join(lines)


def _sweep(spec, profile, workload, deployment, num_points: int = 40) -> dict[str, list[float]]:
    """Throughput vs KV capacity: Eq. 4 roofline, Stage 1 extended and Stage 2 at each point."""
    here = stage1_bound(spec, profile, workload, deployment)
    top = max(2.5 * here.turning_point_bytes, 1.5 * deployment.kv_cache_bytes)
    if token_budget(spec, profile, deployment) < deployment.max_num_tokens:
        top = max(top, 1.2 * deployment.max_num_tokens / here.pme * spec.kv_bytes_per_token)
    placement = place_weights(spec, deployment)
    out: dict[str, list[float]] = {"kv_gib": [], "eq4": [], "stage1": [], "stage2": []}
    for x in range(1, num_points + 1):
        dep = with_kv_bytes(deployment, int(top * x / num_points))
        try:
            s1 = stage1_bound(spec, profile, workload, dep)
            s2 = stage2_predict(spec, profile, workload, dep, placement,
                                token_budget(spec, profile, dep))
        except ValueError:  # below one request's KV: nothing runs
            continue
        out["kv_gib"].append(dep.kv_cache_bytes / GIB)
        out["eq4"].append(s1.t_max)
        out["stage1"].append(s1.throughput)
        out["stage2"].append(s2.total_tokens_per_s)
    return out


def _plot(path: str, sweep: dict[str, list[float]], pred: Prediction, kv_gib: float) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(sweep["kv_gib"], sweep["eq4"], "--", color="grey", label="Stage 1, Eq. 4 roofline")
    ax.plot(sweep["kv_gib"], sweep["stage1"], label="Stage 1 (+ attention, host memory)")
    ax.plot(sweep["kv_gib"], sweep["stage2"], label="Stage 2 (this job)")
    ax.axvline(pred.stage1.turning_point_bytes / GIB, color="grey", linewidth=0.8)
    ax.plot([kv_gib], [pred.stage2.total_tokens_per_s], "o", color="red",
            label=f"chosen: {kv_gib:g} GiB ({pred.bottleneck})")
    ax.set_xlabel("KV cache capacity (GiB)")
    ax.set_ylabel("throughput (prompt + generated tokens/s)")
    ax.set_title("MoE-Lens: throughput vs KV capacity (turning point M* marked)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"moe-lens predict: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    weight_bytes = dtype_bytes(args.dtype or profile.dtype)
    spec = ModelSpec.from_config(load_config(args.model), weight_bytes=weight_bytes,
                                 kv_bytes=dtype_bytes(args.kv_dtype))
    workload = _workload(args)
    device_bytes = None if args.device_memory_gb is None else int(args.device_memory_gb * GIB)
    deployment = Deployment(kv_cache_bytes=int(args.kv_cache_gb * GIB),
                            block_size=args.block_size, device_memory_bytes=device_bytes,
                            max_num_tokens=args.max_num_tokens)
    pred = predict(spec, profile, workload, deployment)
    print(_report(pred, spec, workload))
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(pred), indent=2) + "\n")
    if args.plot:
        _plot(args.plot, _sweep(spec, profile, workload, deployment), pred, args.kv_cache_gb)
        print(f"plot: {args.plot}")
    return 0
