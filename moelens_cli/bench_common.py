"""What the benchmarks share: synthetic workloads, the GEMM roofline, step timings, printing.

Workloads need no download: prompts are random token ids (seeded), lengths are fixed or drawn
from distributions shaped after the workloads of the MoE-Lightning and MoE-Lens papers (see
WORKLOADS and docs/benchmarks.md).

The roofline is the least time the job's GEMMs can take on this machine: every token of the job
goes once through every layer's QKV/O projections, router and top-k experts, and every row that
emits a token through lm_head; each class of GEMM runs at the best rate torch reaches on the
model's own shapes at large M, measured in this process just before the job.
"""

from __future__ import annotations

import json
import math
import random
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from moelens import panel_gemm
from moelens.config import ModelConfig
from moelens.panel_gemm import linear

GEMM_KINDS = ("attention_proj", "router", "experts", "lm_head")
"""Classes of GEMM FLOPs in a job; the router is priced at the attention projections' rate
(it is [T, H] x [H, E], a few hundredths of a percent of the FLOPs)."""


# Models ----------------------------------------------------------------------------------------
BENCH_MODEL_VERSION = "v1"
"""Bump with the bench presets' recipe, so a stale cached checkpoint is rebuilt elsewhere."""


def resolve_bench_model(spec: str, cache_dir: Path | None = None) -> str:
    """A --model value as the launcher takes it: "default" as is, a preset name (e.g.
    bench-mixtral) built once into the user cache (about a minute, 2 GB), else a folder."""
    from moelens.model_presets import PRESETS
    if spec == "default" or spec not in PRESETS:
        return spec
    import platformdirs
    from moelens.default_model import make_model
    root = Path(cache_dir) if cache_dir else Path(platformdirs.user_cache_dir("moe-lens"))
    folder = root / "models" / f"{spec}-{BENCH_MODEL_VERSION}"
    if not (folder / "config.json").is_file():
        try:
            make_model(spec, folder)
        except FileExistsError:  # another process built it meanwhile
            if not (folder / "config.json").is_file():
                raise
    return str(folder)


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for port-0 binds and outgoing connections (Linux; IANA elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def free_port_run(count: int = 3, host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A port p with p .. p+count-1 free now (the launcher puts the services' /metrics there).

    Drawn below the kernel's ephemeral range: the services that start next bind their gRPC
    ports with port 0 and open client connections, and either can take an ephemeral port
    between this check and the bind (a CI run lost the coordinator that way)."""
    low, high = _ephemeral_range()
    lo, hi = (10000, low - count) if low - count > 10000 else (high + 1, 65536 - count)
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(lo, hi)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return base
    raise OSError(f"no run of {count} free ports found on {host}")


# Workloads -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkloadShape:
    """Length distributions of one workload: prompt lengths lognormal around prompt_mean
    (sigma 0 = fixed), generation lengths uniform within ±gen_spread·gen_mean (0 = fixed)."""

    name: str
    prompt_mean: int
    prompt_sigma: float
    gen_mean: int
    gen_spread: float
    source: str
    """Where the statistics come from."""


WORKLOADS: dict[str, WorkloadShape] = {w.name: w for w in (
    WorkloadShape("fixed", 128, 0.0, 64, 0.0,
                  "peers.md bench-mixtral workload: 128 prompt ids, exactly 64 generated"),
    WorkloadShape("chat", 98, 0.8, 192, 1 / 3,
                  "MTBench as MoE-Lightning/MoE-Lens use it: mean prompt 98 tokens, long right "
                  "tail; generation 128-256"),
    WorkloadShape("rag", 926, 0.3, 128, 0.0,
                  "MoE-Lens long-prompt RAG: mean prompt 926 tokens, 128 generated"),
    WorkloadShape("long-gen", 32, 0.5, 512, 0.125,
                  "short prompt, long generation (448-576, mean 512)"),
)}


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    gen_len: int


def sample_lengths(shape: WorkloadShape, num_requests: int, seed: int,
                   prompt_len: int | None = None, gen_len: int | None = None,
                   max_model_len: int | None = None) -> list[tuple[int, int]]:
    """(prompt_len, gen_len) per request; prompt_len/gen_len replace the shape's means."""
    if num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    p_mean = shape.prompt_mean if prompt_len is None else prompt_len
    g_mean = shape.gen_mean if gen_len is None else gen_len
    if p_mean < 1 or g_mean < 1:
        raise ValueError(f"--prompt-len and --gen-len must be >= 1, got {p_mean}, {g_mean}")
    rng = np.random.default_rng(seed)
    if shape.prompt_sigma > 0:
        # lognormal with the requested mean: mu = ln(mean) - sigma^2 / 2
        mu = math.log(p_mean) - shape.prompt_sigma ** 2 / 2
        prompts = np.rint(rng.lognormal(mu, shape.prompt_sigma, num_requests))
        prompts = np.clip(prompts, 1, 8 * p_mean)
    else:
        prompts = np.full(num_requests, p_mean)
    low = max(1, round(g_mean * (1 - shape.gen_spread)))
    high = max(low, round(g_mean * (1 + shape.gen_spread)))
    gens = rng.integers(low, high + 1, num_requests)
    pairs = [(int(p), int(g)) for p, g in zip(prompts, gens)]
    if max_model_len is not None:
        pairs = [(max(1, min(p, max_model_len - g)), g) for p, g in pairs]
        if any(p + g > max_model_len for p, g in pairs):
            raise ValueError(f"--gen-len {g_mean}: longer than the model's context "
                             f"({max_model_len} tokens); lower it")
    return pairs


def make_requests(workload: str, num_requests: int, vocab_size: int, seed: int = 0,
                  prompt_len: int | None = None, gen_len: int | None = None,
                  max_model_len: int | None = None) -> list[BenchRequest]:
    """Seeded random prompt ids in [0, vocab_size) with the workload's lengths."""
    if workload not in WORKLOADS:
        raise ValueError(f"--workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    pairs = sample_lengths(WORKLOADS[workload], num_requests, seed, prompt_len, gen_len,
                           max_model_len)
    rng = np.random.default_rng(seed + 1)
    return [BenchRequest(rng.integers(0, vocab_size, p).tolist(), g) for p, g in pairs]


# Roofline --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobFlops:
    """GEMM FLOPs of a whole job by kind (see GEMM_KINDS)."""

    by_kind: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.by_kind.values())


def job_gemm_flops(cfg: ModelConfig, pairs: list[tuple[int, int]]) -> JobFlops:
    """Each request feeds p + g - 1 tokens through the layers (the last generated token is
    never fed back) and emits g rows through lm_head (the prompt's last row and g - 1 decodes)."""
    h = cfg.hidden_size
    tokens = sum(p + g - 1 for p, g in pairs)
    rows = sum(g for _, g in pairs)
    proj = 2.0 * (h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h)
    router = experts = 0.0
    for layer in range(cfg.num_layers):
        if cfg.is_moe_layer(layer):
            router += 2.0 * h * cfg.num_experts
            experts += 2.0 * 3 * h * (cfg.top_k * cfg.expert_intermediate_size
                                      + cfg.shared_expert_intermediate_size)
        else:
            experts += 2.0 * 3 * h * cfg.dense_intermediate_size
    return JobFlops({"attention_proj": tokens * proj * cfg.num_layers, "router": tokens * router,
                     "experts": tokens * experts, "lm_head": rows * 2.0 * h * cfg.vocab_size})


@dataclass(frozen=True)
class GemmRates:
    """Best FLOP/s reached per kind on the model's shapes (F.linear or the panel GEMM)."""

    flops_per_s: dict[str, float]
    threads: int
    rows: int
    """M of the projection and expert GEMMs (lm_head uses fewer: its N is the vocabulary)."""
    dtype: str = "float32"

    def best(self, other: "GemmRates") -> "GemmRates":
        """The faster rate per kind of two measurements (e.g. before and after a job): on a
        shared machine a slow moment would otherwise lower the peak, flattering the fraction."""
        rates = {kind: max(rate, other.flops_per_s.get(kind, 0.0))
                 for kind, rate in self.flops_per_s.items()}
        return replace(self, flops_per_s=rates)


def cpu_jiffies() -> tuple[int, int] | None:
    """(steal, total) clock ticks of all CPUs from /proc/stat, or None where there is none.
    Steal is time a virtual CPU wanted to run while its host ran something else: on a shared
    VM the part of a measurement's noise no setting of ours can remove."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def steal_fraction(before: tuple[int, int] | None,
                   after: tuple[int, int] | None) -> float | None:
    """The share of the CPUs' time stolen between two cpu_jiffies() readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _weights(*shape: int) -> torch.Tensor:
    return torch.empty(shape).uniform_(-0.02, 0.02)


def best_rate(fn: Callable[[], object], flops: float, repeats: int) -> float:
    """FLOP/s of fn's fastest of `repeats` calls, after one warm-up call."""
    fn()  # warm-up: first-touch pages, MKL/oneDNN kernel selection
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best


def measure_gemm_rates(cfg: ModelConfig, threads: int, rows: int = 4096, head_rows: int = 256,
                       repeats: int = 3, dtype: str = "float32") -> GemmRates:
    """The best GEMM rate this machine reaches on the model's shapes at large M in `dtype` (the
    dtype the experts are served in): torch's F.linear (MKL or oneDNN) and, where it runs (fp32,
    bf16 on AVX512-BF16 or AMX), the panel GEMM the expert service uses on CPUs, whichever is
    faster per kind; minimum time of `repeats` (the least-disturbed run on a shared machine is
    the hardware's best)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    h, i = cfg.hidden_size, max(cfg.expert_intermediate_size, cfg.dense_intermediate_size)
    kind = getattr(torch, dtype)
    panels = kind in (torch.float32, torch.bfloat16) and panel_gemm.is_supported(kind)
    kernels = [False] + ([True] if panels else [])
    rates: dict[str, float] = {}
    try:
        x = torch.empty(rows, h).uniform_(-1, 1).to(kind)  # [M, H]
        xi = torch.empty(rows, i).uniform_(-1, 1).to(kind)  # [M, I]
        xq = torch.empty(rows, cfg.q_size).uniform_(-1, 1).to(kind)  # [M, q]
        xh = x[:head_rows]
        plain = {name: t.to(kind) for name, t in (
            ("qkv", _weights(cfg.q_size + 2 * cfg.kv_size, h)), ("o", _weights(h, cfg.q_size)),
            ("gate_up", _weights(2 * i, h)), ("down", _weights(h, i)),
            ("head", _weights(cfg.vocab_size, h)))}
        for panels in kernels:
            w = {name: panel_gemm.maybe_pack(t, panels) for name, t in plain.items()}
            measured = {
                "attention_proj": best_rate(lambda: (linear(x, w["qkv"]), linear(xq, w["o"])),
                                        2.0 * rows * (plain["qkv"].numel() + plain["o"].numel()),
                                        repeats),
                "experts": best_rate(lambda: (linear(x, w["gate_up"]), linear(xi, w["down"])),
                                 2.0 * rows * (plain["gate_up"].numel() + plain["down"].numel()),
                                 repeats),
                "lm_head": best_rate(lambda: linear(xh, w["head"]),
                                 2.0 * xh.shape[0] * plain["head"].numel(), repeats),
            }
            for kind, rate in measured.items():
                rates[kind] = max(rates.get(kind, 0.0), rate)
    finally:
        torch.set_num_threads(previous)
    rates["router"] = rates["attention_proj"]
    return GemmRates(rates, threads, rows, dtype)


@dataclass(frozen=True)
class Roofline:
    gemm_flops: float
    min_time_s: float
    """Σ over kinds of FLOPs / best rate: the job's GEMMs alone, nothing else."""
    peak_flops_per_s: float
    """gemm_flops / min_time_s: the effective peak on this job's mix of shapes."""

    def fraction(self, measured_s: float) -> float:
        """min_time / measured time: 1.0 would be every second spent in peak-rate GEMMs."""
        return self.min_time_s / measured_s if measured_s > 0 else 0.0


def roofline(flops: JobFlops, rates: GemmRates) -> Roofline:
    min_time = sum(f / rates.flops_per_s[kind] for kind, f in flops.by_kind.items())
    return Roofline(flops.total, min_time, flops.total / min_time if min_time > 0 else 0.0)


# Results ---------------------------------------------------------------------------------------
@dataclass
class ThroughputResult:
    num_requests: int
    num_prompt_tokens: int
    num_output_tokens: int
    elapsed_s: float

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.num_prompt_tokens + self.num_output_tokens) / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s


def format_throughput(result: ThroughputResult) -> str:
    """vLLM's benchmark_throughput line, character for character."""
    return (f"Throughput: {result.requests_per_s:.2f} requests/s, "
            f"{result.total_tokens_per_s:.2f} total tokens/s, "
            f"{result.output_tokens_per_s:.2f} output tokens/s")


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
