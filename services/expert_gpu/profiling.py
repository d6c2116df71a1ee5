"""Warmup measurements of the expert service: host->device bandwidth and the GEMM time line.

The GEMM curve is measured on this model's own layers (projections + routed experts with tokens
grouped per expert, routed by the real router) at token counts from 1 to 1024, taking the resident
layers in turn as a job does, so that each layer's weights come back from memory. The line is
fitted robustly (Theil-Sen, `moelens.profiler.fit_line`) on the counts from 32 up: the
performance model derives n_real from its slope and intercept, and a least-squares fit through
three points moved the budget between 421 and 1882 tokens from one start to the next. Below 32
tokens the curve bends away from the line (a decode row reads only the experts it picks), so the
points themselves go to the performance model, which prices small iterations from them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moelens.model.stages import post_attention, pre_attention, rope_tables
from moelens.profiler import fit_line
from moelens.sampling import RowSampling, SamplingParams
from moelens.v1 import attention_pb2
from services.expert_gpu.runner import SeqStep

WARMUP_SEQ_ID = -1


@dataclass(frozen=True)
class ExpertProfile:
    h2d_bytes_per_s: float
    gemm_intercept_s: float
    gemm_slope_s: float
    gemm_curve: tuple[tuple[int, float], ...]
    """(tokens, seconds) of every timed count: the points the line was fitted to and below."""
    exchange_fixed_s: float
    exchange_s_per_byte: float


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure_h2d(worker, repeats: int = 3) -> float:
    """Bandwidth of copying the largest layer's packed host buffer to a device buffer."""
    src = max(worker.store.host_flat, key=lambda t: t.numel())
    dst = torch.empty_like(src, device=worker.device)
    dst.copy_(src)
    start = _now(worker.device)
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    seconds = _now(worker.device) - start
    return repeats * src.numel() * src.element_size() / max(seconds, 1e-9)


CURVE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LINE_MIN_TOKENS = 32
"""The line is fitted on the counts from here up (the range n_real lives in)."""


CURVE_COLD_BYTES = 256 << 20
"""The curve takes leading resident layers in turn until they hold this many bytes (several times
any last-level cache): one layer timed over and over stays in the cache, which a job's layers do
not (the default model's 20 MB fp32 layer on a 32 MB L3: 10-45% faster hot than in turn at 1-32
tokens, the same from 128 up; the in-situ GEMM scales fitted to the hot curve then priced decode
steps 7-11% fast, validation run 30)."""


def curve_layers(worker) -> list[int]:
    """The layers measure_gemm_curve takes in turn: resident MoE layers (the kind the profile's
    bytes and FLOPs per layer describe, moelens.profiler.layer_weight_bytes) from the first,
    until they hold CURVE_COLD_BYTES; layer 0 alone when nothing is resident."""
    store = worker.store
    kind = [i for i in range(store.num_resident) if worker.cfg.is_moe_layer(i)] \
        or list(range(store.num_resident))
    layers, held = [], 0
    for i in kind:
        if held >= CURVE_COLD_BYTES:
            break
        layers.append(i)
        held += store.layer_bytes(i)
    return layers or [0]


def measure_gemm_curve(worker, token_counts=CURVE_TOKENS) -> tuple[tuple[int, float], ...]:
    """(tokens, seconds per layer) of the layers' GEMMs (attention replaced by zeros) per count:
    the best of 3 rounds over curve_layers, each round's time divided by its layers."""
    cfg, layers = worker.cfg, curve_layers(worker)
    weights = [worker.store.layer(i) for i in layers]
    points = []
    for n in sorted({min(n, worker.config.max_num_tokens) for n in token_counts}):
        hidden = torch.randn(n, cfg.hidden_size, device=worker.device, dtype=worker.weights.embed.dtype)
        rope = rope_tables(torch.arange(n, device=worker.device), worker.runner.inv_freq,
                           hidden.dtype)
        attn = torch.zeros(n, cfg.num_heads, cfg.head_dim, device=worker.device, dtype=hidden.dtype)
        best = float("inf")
        for _ in range(3):
            start = _now(worker.device)
            for lw in weights:
                pre_attention(cfg, lw, hidden, rope)
                post_attention(cfg, lw, hidden, attn)
            best = min(best, (_now(worker.device) - start) / len(weights))
        points.append((n, best))
    for i in layers:
        worker.store.release(i)
    return tuple(points)


def fit_gemm_line(curve: tuple[tuple[int, float], ...]) -> tuple[float, float]:
    """(intercept_s, slope_s) through the curve's points from LINE_MIN_TOKENS up (all of them
    when fewer than two are; a line through the origin when only one point was timed)."""
    points = [p for p in curve if p[0] >= LINE_MIN_TOKENS]
    points = points if len(points) >= 2 else list(curve)
    if len(points) < 2:
        return 0.0, max(points[0][1] / points[0][0], 1e-12)
    intercept, slope = fit_line([float(n) for n, _ in points], [t for _, t in points])
    return intercept, max(slope, 1e-12)


def measure_exchange(worker, num_tokens: int = 256, repeats: int = 5) -> tuple[float, float]:
    """(fixed s, s per byte) of one layer exchange on the real stream: an empty round trip, and
    one carrying `num_tokens` rows of k, v and q (stored into the warmup sequence's slots)."""
    cfg, bs = worker.cfg, worker.runner.block_size
    blocks = list(range(-(-num_tokens // bs)))
    plan = attention_pb2.AttentionPlan(slots=list(range(num_tokens)))
    plan.sequences.add(seq_id=WARMUP_SEQ_ID, block_ids=blocks)

    dtype = worker.weights.embed.dtype  # what the runner sends

    def round_trip(n: int) -> float:
        k = torch.zeros(n, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
        q = torch.zeros(0, cfg.num_heads, cfg.head_dim, dtype=dtype)
        best = float("inf")
        for _ in range(repeats):
            request = attention_pb2.LayerRequest(step_id=0, layer=0, group=0)
            request.plan.CopyFrom(attention_pb2.AttentionPlan(slots=plan.slots[:n],
                                                              sequences=plan.sequences))
            start = time.perf_counter()
            worker.attention.send_layer(request, {"k": k, "v": k, "q": q})
            worker.attention.recv_out()
            best = min(best, time.perf_counter() - start)
        return best

    fixed = round_trip(0)
    per_byte = max(0.0, round_trip(num_tokens) - fixed) / (2 * num_tokens * cfg.kv_size
                                                            * dtype.itemsize)
    worker.attention.free([WARMUP_SEQ_ID])
    return fixed, per_byte


def run_dummy_step(worker, num_tokens: int = 16) -> None:
    """One real step through the attention service, then release its blocks there."""
    bs = worker.runner.block_size
    blocks = list(range(-(-(num_tokens + 1) // bs)))
    prompt = SeqStep(WARMUP_SEQ_ID, [0] * num_tokens, 0, blocks, emit=True)
    row = [RowSampling(SamplingParams(temperature=0.0), 0, 0)]
    worker.runner.run(0, [prompt], row, pipeline=False)
    decode = SeqStep(WARMUP_SEQ_ID, [0], num_tokens, blocks, emit=True)
    worker.runner.run(0, [decode], row, pipeline=False)
    worker.attention.free([WARMUP_SEQ_ID])


def measure_profile(worker) -> ExpertProfile:
    run_dummy_step(worker)
    h2d = measure_h2d(worker)
    curve = measure_gemm_curve(worker)
    intercept, slope = fit_gemm_line(curve)
    if worker.store.num_resident == 0:
        # layer 0 was streamed: walk the rest so the data mover's schedule stays in step order
        for layer in range(1, worker.cfg.num_layers):
            worker.store.layer(layer)
            worker.store.release(layer)
    worker.store.take_counters()
    fixed, per_byte = measure_exchange(worker)
    return ExpertProfile(h2d_bytes_per_s=h2d, gemm_intercept_s=intercept, gemm_slope_s=slope,
                         gemm_curve=curve, exchange_fixed_s=fixed, exchange_s_per_byte=per_byte)
