"""Measure a HardwareProfile on this machine with torch.

What is measured, and how (each function stands alone; `profile_local` runs them all):

- GEMM line: one decoder layer of the model's shapes — QKV/O projections, router, and the routed
  expert GEMMs with tokens grouped per expert (top_k·n/E rows each, gate/up/down) plus a shared
  expert if any, with the expert service's kernels (panel GEMMs or F.linear, as its
  --cpu-gemm) — timed at several token counts and fitted robustly (Theil-Sen): s = a + b·n.
  Layers too large for `max_weight_bytes` time a subset of experts and scale by E / subset.
- Host memory bandwidth: streaming read (a sum over a buffer far larger than the caches).
- Host→device bandwidth (B_IO): pinned ~1 GB copies on CUDA; on a CPU-only host the data mover's
  copy into a separate preallocated buffer, in ~100 MB packets.
- CPU attention KV bytes/s: a paged decode attention kernel passed in by the caller (the common
  package does not import services); defaults to the torch reference `paged_attention`.
- Activation exchange: a callable that moves n bytes across; defaults to an in-process memcpy,
  a lower bound on the shared-memory channel.

Timings take the minimum over repeats: the machine is shared and the minimum is the least noisy
estimate of what the hardware does. `quick=True` keeps the whole run to a few seconds.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from moelens import panel_gemm
from moelens.config import ModelConfig
from moelens.kv_cache import pool_shapes
from moelens.model.attention import paged_attention
from moelens.model.moe import swiglu
from moelens.panel_gemm import PanelWeight, linear
from moelens.profile import HardwareProfile

AttentionKernel = Callable[..., torch.Tensor]
"""paged_attention(q [R,Hq,D], k_pool, v_pool [N,Hkv,B,D], block_tables [R,nb] int32,
context_lens [R] int32, scale) -> [R,Hq,D]."""

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int,
               min_total_s: float = 0.05, max_repeats: int = 200) -> float:
    """Minimum wall time of `fn` after one warm-up run: at least `repeats` runs, and more (up to
    max_repeats) until min_total_s has passed, so short kernels get enough samples to dodge
    preemption on a shared machine."""
    fn()
    _sync(device)
    best, spent, runs = math.inf, 0.0, 0
    while runs < repeats or (spent < min_total_s and runs < max_repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Theil-Sen (intercept, slope) of ys vs xs: the median of the pairwise slopes, then the
    median intercept, so one point timed while the machine was busy does not tilt the line as it
    does a least-squares fit. A negative intercept is clamped to 0 and the slope taken through
    the origin (the median of y/x): a profile cannot have a negative fixed cost."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("fit_line needs at least two (x, y) points of equal count")
    pairs = [(i, j) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[i] != xs[j]]
    if not pairs:
        raise ValueError("fit_line needs at least two distinct x values")
    slope = statistics.median((ys[j] - ys[i]) / (xs[j] - xs[i]) for i, j in pairs)
    intercept = statistics.median(y - slope * x for x, y in zip(xs, ys))
    if intercept < 0:
        return 0.0, statistics.median(y / x for x, y in zip(xs, ys) if x != 0)
    return intercept, slope


def layer_flops_per_token(cfg: ModelConfig) -> float:
    """GEMM FLOPs of one token through one MoE layer (QKV/O, router, top-k + shared experts)."""
    h = cfg.hidden_size
    attn = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h
    mlp = cfg.top_k * 3 * h * cfg.expert_intermediate_size + h * cfg.num_experts \
        + 3 * h * cfg.shared_expert_intermediate_size
    return 2.0 * (attn + mlp)


def layer_weight_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Weight bytes of the first MoE layer (the layer the GEMM line is measured on)."""
    moe = next((i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)), 0)
    return cfg.layer_parameter_counts()[moe] * dtype_bytes


@dataclass(frozen=True)
class GemmMeasurement:
    """GEMM time of one layer vs tokens, and its fitted line."""

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    intercept_s: float
    slope_s_per_token: float
    num_experts_timed: int
    """Experts actually run; their time was scaled by num_experts / num_experts_timed."""


def _layer_weights(cfg: ModelConfig, num_experts: int, device: torch.device,
                   dtype: torch.dtype, panels: bool) -> dict[str, torch.Tensor | PanelWeight]:
    """One layer's GEMM weights in the [N, K] layout the expert service uses (panels or not)."""
    h, i, s = cfg.hidden_size, cfg.expert_intermediate_size, cfg.shared_expert_intermediate_size

    def plain(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype).uniform_(-0.02, 0.02)

    def w(*shape: int, gated: bool = False) -> torch.Tensor | PanelWeight:
        return panel_gemm.maybe_pack(plain(*shape), panels, gated)

    weights = {"qkv": w(cfg.q_size + 2 * cfg.kv_size, h), "o": w(h, cfg.q_size),
               "router": plain(cfg.num_experts, h),
               "gate_up": w(num_experts, 2 * i, h, gated=True), "down": w(num_experts, h, i)}
    if s:
        weights["shared_gate_up"], weights["shared_down"] = w(2 * s, h, gated=True), w(h, s)
    return weights


def measure_gemm_line(cfg: ModelConfig, token_counts: tuple[int, ...] = (64, 256, 1024, 2048),
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      repeats: int = 3, max_weight_bytes: int = 1 << 30,
                      cpu_gemm: str = "auto") -> GemmMeasurement:
    """Time one layer's GEMMs at each token count and fit seconds = intercept + slope · tokens.

    cpu_gemm: as the expert service's --cpu-gemm (panel_gemm.resolve_mode)."""
    device = torch.device(device)
    panels = panel_gemm.resolve_mode(cpu_gemm, device.type, dtype)
    elem = torch.finfo(dtype).bits // 8
    per_expert = 3 * cfg.hidden_size * cfg.expert_intermediate_size * elem
    timed = max(1, min(cfg.num_experts, max_weight_bytes // per_expert))
    scale = cfg.num_experts / timed
    wts = _layer_weights(cfg, timed, device, dtype, panels)
    seconds = []
    for n in token_counts:
        rows = math.ceil(cfg.top_k * n / cfg.num_experts)
        x = torch.empty(n, cfg.hidden_size, device=device, dtype=dtype).uniform_(-1, 1)  # [T, H]
        xe = x[:rows] if rows <= n else x.repeat(math.ceil(rows / n), 1)[:rows]  # [r, H]

        def dense() -> None:
            qkv = linear(x, wts["qkv"])  # [T, q + 2kv]
            _ = linear(qkv[:, :cfg.q_size], wts["o"])  # [T, H]
            _ = linear(x, wts["router"])  # [T, E]
            if "shared_gate_up" in wts:
                swiglu(x, wts["shared_gate_up"], wts["shared_down"])

        def experts() -> None:
            for e in range(timed):
                swiglu(xe, wts["gate_up"][e], wts["down"][e])

        seconds.append(_best_time(dense, device, repeats)
                       + scale * _best_time(experts, device, repeats))
    intercept, slope = fit_line([float(n) for n in token_counts], seconds)
    return GemmMeasurement(tuple(token_counts), tuple(seconds), intercept, slope, timed)


def measure_host_memory_bandwidth(num_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """Streaming read bandwidth of host memory, bytes/s."""
    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    return num_bytes / _best_time(lambda: buf.sum(), torch.device("cpu"), repeats)


def measure_copy_bandwidth(device: str | torch.device = "cpu", num_bytes: int = 1 << 30,
                           packet_bytes: int = 100 << 20, repeats: int = 3) -> float:
    """Host→device weight copy bandwidth (B_IO), bytes copied per second."""
    device = torch.device(device)
    if device.type == "cuda":
        src = torch.empty(num_bytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        return num_bytes / _best_time(lambda: dst.copy_(src, non_blocking=True), device, repeats)
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def copy() -> None:
        for start in range(0, num_bytes, packet_bytes):
            dst[start:start + packet_bytes].copy_(src[start:start + packet_bytes])

    return num_bytes / _best_time(copy, device, repeats)


def measure_attention_bandwidth(cfg: ModelConfig, kernel: AttentionKernel | None = None,
                                pool_bytes: int = 128 << 20, context_len: int = 1024,
                                block_size: int = 16, dtype: torch.dtype = torch.float32,
                                repeats: int = 3) -> float:
    """KV bytes/s a decode attention kernel reads: one query row per sequence, one layer."""
    kernel = paged_attention if kernel is None else kernel
    elem = torch.finfo(dtype).bits // 8
    num_seqs = max(1, pool_bytes // (2 * context_len * cfg.kv_size * elem))
    blocks_per_seq = -(-context_len // block_size)
    k_shape, v_shape = pool_shapes(num_seqs * blocks_per_seq, cfg.num_kv_heads, block_size,
                                   cfg.head_dim)
    k_pool = torch.empty(k_shape, dtype=dtype).uniform_(-1, 1)  # [N, Hkv, D, B]
    v_pool = torch.empty(v_shape, dtype=dtype).uniform_(-1, 1)  # [N, Hkv, B, D]
    q = torch.empty(num_seqs, cfg.num_heads, cfg.head_dim).uniform_(-1, 1)  # fp32 whatever the KV
    tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, -1)
    lens = torch.full((num_seqs,), context_len, dtype=torch.int32)
    scale = cfg.head_dim ** -0.5
    seconds = _best_time(lambda: kernel(q, k_pool, v_pool, tables, lens, scale),
                         torch.device("cpu"), repeats)
    return 2 * num_seqs * context_len * cfg.kv_size * elem / seconds


def measure_exchange(send: Callable[[int], None] | None = None,
                     sizes: tuple[int, int] = (4 << 10, 16 << 20),
                     repeats: int = 5) -> tuple[float, float]:
    """(fixed seconds, seconds per byte) of moving activations across; `send(n)` moves n bytes.

    The default is an in-process memcpy between preallocated buffers (the shared-memory channel's
    floor); services pass a callable that crosses their real channel.
    """
    if send is None:
        src = torch.ones(max(sizes), dtype=torch.uint8)
        dst = torch.empty_like(src)

        def send(n: int) -> None:
            dst[:n].copy_(src[:n])

    times = [_best_time(lambda n=n: send(n), torch.device("cpu"), repeats) for n in sizes]
    fixed, per_byte = fit_line([float(s) for s in sizes], times)
    return fixed, per_byte


@dataclass(frozen=True)
class ProfilerSettings:
    """Sizes of the measurements; `quick()` finishes in a few seconds."""

    token_counts: tuple[int, ...] = (64, 256, 1024, 2048)
    max_weight_bytes: int = 1 << 30
    memory_bytes: int = 1 << 30
    copy_bytes: int = 1 << 30
    attention_pool_bytes: int = 128 << 20
    repeats: int = 3

    @classmethod
    def quick(cls) -> "ProfilerSettings":
        return cls(token_counts=(16, 64, 256), max_weight_bytes=64 << 20,
                   memory_bytes=128 << 20, copy_bytes=128 << 20,
                   attention_pool_bytes=64 << 20, repeats=1)


def profile_local(cfg: ModelConfig, quick: bool = False, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32,
                  attention_kernel: AttentionKernel | None = None,
                  exchange: Callable[[int], None] | None = None,
                  kv_dtype: torch.dtype = torch.float32) -> HardwareProfile:
    """Measure everything on this machine for `cfg`'s layer shapes and return the profile: GEMMs
    in the served `dtype`, attention over a `kv_dtype` cache."""
    device = torch.device(device)
    settings = ProfilerSettings.quick() if quick else ProfilerSettings()
    # The torch reference loops over rows in Python and is far slower than the native kernel: a
    # small pool keeps the run short (its figure is a placeholder until a kernel is passed in).
    pool_bytes = settings.attention_pool_bytes if attention_kernel else \
        min(settings.attention_pool_bytes, 8 << 20)
    gemm = measure_gemm_line(cfg, settings.token_counts, device, dtype, settings.repeats,
                             settings.max_weight_bytes)
    if gemm.slope_s_per_token <= 0:
        raise ValueError(f"GEMM time did not grow with tokens ({gemm.seconds} s at "
                         f"{gemm.tokens} tokens); re-run on a quieter machine or without --quick")
    fixed, per_byte = measure_exchange(exchange, repeats=settings.repeats + 2)
    elem = torch.finfo(dtype).bits // 8
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    return HardwareProfile(
        io_bandwidth_bytes_per_s=measure_copy_bandwidth(device, settings.copy_bytes,
                                                        repeats=settings.repeats),
        gemm_intercept_s=gemm.intercept_s, gemm_slope_s_per_token=gemm.slope_s_per_token,
        attention_kv_bytes_per_s=measure_attention_bandwidth(
            cfg, attention_kernel, pool_bytes, dtype=kv_dtype, repeats=settings.repeats),
        host_memory_bandwidth_bytes_per_s=measure_host_memory_bandwidth(
            settings.memory_bytes, settings.repeats),
        exchange_fixed_s=fixed, exchange_s_per_byte=per_byte,
        is_accelerator_separate=device.type != "cpu",
        gemm_layer_flops_per_token=layer_flops_per_token(cfg),
        gemm_layer_weight_bytes=float(layer_weight_bytes(cfg, elem)),
        device=f"{device.type}: {name}", dtype=_DTYPE_NAMES.get(dtype, str(dtype)))
