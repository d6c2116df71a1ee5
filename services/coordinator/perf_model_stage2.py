"""Stage 2: a finite job of K requests under real scheduling (ramp-up, drain, paged KV).

The paper does not give these equations; this is a fluid reconstruction, to be checked against
measurement. Engine semantics: a request admitted at iteration a is prefilled there (p tokens,
emits its first token) and decodes one token in each of iterations a+1 … a+g−1, so it lives g
iterations, processes p + g − 1 tokens and holds p + j KV tokens in ceil((p + j)/b) blocks at its
stage j = 0 … g−1 (the last token's KV is never stored).

Admission at a constant rate of q requests per iteration (the scheduler's choice), per class c of
(p_c, g_c) in proportion w_c = K_c / K:

    F   = Σ_c w_c Σ_{j<g_c} ceil((p_c + j)/b)      blocks·iterations one request holds, on average
    τ   = Σ_c w_c (p_c + g_c − 1)                   tokens one request makes the engine process
    q_kv     = ⌊M/b⌋ / F                            steady KV use q·F blocks fits the cache
    q_budget = n_real / τ                           steady tokens q·τ fit the token budget
    q = min(q_kv, q_budget);  A = ⌈K / q⌉ admission iterations, each admitting K_c / A of class c
    (a job too short to reach steady state may admit faster: the smallest A whose peak blocks
    and tokens over all its iterations fit ⌊M/b⌋ and n_real)
    iterations = A + g_max − 1:
        ramp   i < min(A, g_max − 1)        not every stage populated yet
        steady g_max − 1 ≤ i ≤ A − 1        identical iterations (counted, not looped)
        drain  i ≥ A                        no admissions, the pipeline empties
    at iteration i class c has stages j ∈ [max(0, i − A + 1), min(g_c − 1, i)] live, each with
    K_c / A requests: stage 0 adds p_c prompt tokens, stages ≥ 1 one decode token and a decode
    attention read of p_c + j KV tokens; every live request emits one token (an lm_head row).
    time = Σ_i iteration_cost(tokens_i, decode_i, kv_read_i, rows_i).total_s

Block fragmentation enters through the ceil; ramp-up and drain through iterations that stream
all weights for fewer tokens. As K grows the steady part dominates and, with b = 1, the rate
q·(p + g)/t tends to Stage 1's PME·M/t (they differ by (p + g/2)/(p + (g−1)/2), the paper's
Eq. 3 approximation). The coordinator's scheduler is greedy instead (it front-loads prompts
while the cache is empty and preempts later): perf_model_schedule replays exactly that, and
`predict(..., replay=True)` reports it as stage2_scheduled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moelens.profile import HardwareProfile
from services.coordinator.perf_model_iteration import (IterationCost, Placement,
                                                       classify_bottleneck, gemm_line,
                                                       iteration_cost)
from services.coordinator.perf_model_types import Deployment, ModelSpec, Workload


@dataclass(frozen=True)
class Stage2Prediction:
    """The predicted run of one finite job."""

    total_time_s: float
    output_tokens_per_s: float
    """Generated tokens / total time."""
    total_tokens_per_s: float
    """(Prompt + generated tokens) / total time: the unit of Stage 1's T."""
    num_iterations: int
    num_admission_iterations: int
    """A: iterations that admit prompts."""
    ramp_up_iterations: int
    ramp_up_s: float
    steady_iterations: int
    steady_s: float
    drain_iterations: int
    drain_s: float
    admitted_per_iteration: float
    """q actually used: K / A (≤ min(q_kv, q_budget) once the job reaches steady state)."""
    q_kv: float
    q_budget: float
    tokens_per_steady_iteration: float
    kv_blocks_steady: float
    kv_fragmentation: float
    """Share of allocated KV slots left empty by partly filled blocks (steady state)."""
    steady_iteration: IterationCost
    """The fullest iteration (the steady one, or the last admission for short jobs)."""
    bottleneck: str
    num_preemptions: int = 0
    """Requests preempted (and recomputed) on the way (the scheduler's replay only)."""
    token_budget: int = 0
    """Tokens per iteration the job ran with."""
    mean_tokens_per_iteration: float = 0.0
    """Tokens of the job (without recompute) / iterations."""
    components_s: dict[str, float] = field(default_factory=dict)
    """Seconds of the whole job per priced component (gemm, attention, exchange,
    prefill_attention, overhead; the scheduler's replay only)."""


@dataclass(frozen=True)
class _Classes:
    p: np.ndarray  # [C]
    g: np.ndarray  # [C]
    k: np.ndarray  # [C]
    block_prefix: np.ndarray  # [C, g_max + 1]: Σ_{j<x} ceil((p + j)/b)


MAX_CLASSES = 64
"""Mixes with more distinct (p, g) are binned to this many classes (cost grows with classes)."""


def _binned(rows: list[tuple[int, int, int]], max_classes: int) -> list[tuple[int, int, int]]:
    """Group (p, g, count) rows into at most max_classes: equal-count bins by g, then by p within
    each; a bin is its count-weighted mean (p, g)."""
    if len(rows) <= max_classes:
        return rows
    side = max(1, math.isqrt(max_classes))

    def split(items: list, key) -> list[list]:
        items = sorted(items, key=key)
        total, out, acc = sum(r[2] for r in items), [[]], 0
        for r in items:
            if acc >= total * len(out) / side and out[-1]:
                out.append([])
            out[-1].append(r)
            acc += r[2]
        return out

    binned = []
    for by_g in split(rows, key=lambda r: (r[1], r[0])):
        for group in split(by_g, key=lambda r: (r[0], r[1])):
            n = sum(r[2] for r in group)
            binned.append((max(1, round(sum(r[0] * r[2] for r in group) / n)),
                           max(1, round(sum(r[1] * r[2] for r in group) / n)), n))
    return binned


def _classes(workload: Workload, block_size: int) -> _Classes:
    rows = _binned(workload.classes(), MAX_CLASSES)
    g_max = max(g for _, g, _ in rows)
    prefix = np.zeros((len(rows), g_max + 1))
    for c, (p, g, _) in enumerate(rows):
        blocks = -(-(p + np.arange(g_max)) // block_size)  # [g_max]
        prefix[c, 1:] = np.cumsum(blocks)
    return _Classes(np.array([r[0] for r in rows], float), np.array([r[1] for r in rows], float),
                    np.array([r[2] for r in rows], float), prefix)


def _check_fits(workload: Workload, spec: ModelSpec, deployment: Deployment) -> int:
    """KV capacity in blocks; ValueError when the longest request cannot fit on its own."""
    b = deployment.block_size
    num_blocks = deployment.kv_capacity_tokens(spec) // b
    longest = max(p + g for p, g, _ in workload.classes())
    need = -(-longest // b)
    if need > num_blocks:
        need_bytes = need * b * spec.kv_bytes_per_token
        raise ValueError(
            f"kv_cache_bytes {deployment.kv_cache_bytes} holds {num_blocks * b} tokens but one "
            f"request needs p + g = {longest}; set kv_cache_bytes >= {need_bytes} "
            f"({need_bytes / 2**30:.3f} GiB) or shorten the requests")
    return num_blocks


def _iteration_loads(cls: _Classes, steps: np.ndarray, num_admissions: int) -> dict:
    """Per iteration i in `steps` ([I]): tokens, decode rows, KV read, blocks, output rows."""
    i = steps[:, None].astype(float)  # [I, 1]
    rate = cls.k[None, :] / num_admissions  # [1, C]
    lo = np.maximum(0.0, i - num_admissions + 1)  # [I, C] via broadcast below
    hi = np.minimum(cls.g[None, :] - 1, i)  # [I, C]
    lo = np.broadcast_to(lo, hi.shape)
    live = np.maximum(0.0, hi - lo + 1)  # [I, C]
    dlo = np.maximum(lo, 1.0)
    num_dec = np.maximum(0.0, hi - dlo + 1)  # [I, C]
    prefill = np.where(lo == 0, cls.p[None, :], 0.0) * (live > 0)
    kv_read = num_dec * cls.p[None, :] + num_dec * (dlo + hi) / 2
    hi_idx = np.clip(hi + 1, 0, None).astype(int)
    lo_idx = np.minimum(lo, hi + 1).clip(0).astype(int)
    rows_c = np.arange(len(cls.p))[None, :]
    blocks = cls.block_prefix[rows_c, hi_idx] - cls.block_prefix[rows_c, lo_idx]
    held = live * cls.p[None, :] + live * (lo + hi) / 2
    return {name: [float(v) for v in (rate * arr).sum(axis=1)] for name, arr in (
        ("tokens", prefill + num_dec), ("decode", num_dec), ("kv_read", kv_read),
        ("blocks", blocks * (live > 0)), ("rows", live), ("held", held))}


def _admission_rate(cls: _Classes, num_blocks: int, n_real: int) -> tuple[float, float]:
    weights = cls.k / cls.k.sum()
    per_request_blocks = cls.block_prefix[np.arange(len(cls.p)), cls.g.astype(int)]
    mean_blocks = float((weights * per_request_blocks).sum())
    mean_tokens = float((weights * (cls.p + cls.g - 1)).sum())
    return float(num_blocks / mean_blocks), float(n_real / mean_tokens)


def _fits(cls: _Classes, num_adm: int, num_blocks: int, n_real: int) -> tuple[bool, bool]:
    """(blocks fit the cache, tokens fit the budget) at every iteration when admitting over
    num_adm iterations."""
    steps = np.arange(num_adm + int(cls.g.max()) - 1)
    loads = _iteration_loads(cls, steps, num_adm)
    return (max(loads["blocks"]) <= num_blocks * (1 + 1e-9),
            max(loads["tokens"]) <= n_real * (1 + 1e-9))


def _choose_admissions(cls: _Classes, num_blocks: int, n_real: int) -> tuple[int, bool]:
    """(A, is the KV cache what stops a faster admission).

    A job long enough to reach steady state admits at q = min(q_kv, q_budget). A shorter job
    never fills the pipeline, so its peak KV and tokens stay below the steady-state levels and it
    may admit faster: search the smallest A whose every iteration fits (peaks fall as A grows).
    """
    q_kv, q_budget = _admission_rate(cls, num_blocks, n_real)
    total_k = float(cls.k.sum())
    a_steady = max(1, math.ceil(total_k / min(q_kv, q_budget) - 1e-9))
    if a_steady >= int(cls.g.max()) - 1:
        return a_steady, bool(q_kv < q_budget)
    low, high = 1, a_steady  # high always fits: its rate is within the steady-state limits
    while low < high:
        mid = (low + high) // 2
        if all(_fits(cls, mid, num_blocks, n_real)):
            high = mid
        else:
            low = mid + 1
    return high, high > 1 and not _fits(cls, high - 1, num_blocks, n_real)[0]


def stage2_predict(spec: ModelSpec, profile: HardwareProfile, workload: Workload,
                   deployment: Deployment, placement: Placement, n_real: int) -> Stage2Prediction:
    """Price the job iteration by iteration (see the module docstring)."""
    num_blocks = _check_fits(workload, spec, deployment)
    cls = _classes(workload, deployment.block_size)
    q_kv, q_budget = _admission_rate(cls, num_blocks, n_real)
    num_adm, is_kv_limited = _choose_admissions(cls, num_blocks, n_real)
    total_k = workload.num_requests
    g_max = int(cls.g.max())
    num_ramp = min(num_adm, g_max - 1)
    num_steady = max(0, num_adm - (g_max - 1))
    ramp, drain = np.arange(num_ramp), np.arange(num_adm, num_adm + g_max - 1)
    steps = np.concatenate([ramp, drain, [g_max - 1] if num_steady else []])
    loads = _iteration_loads(cls, steps, num_adm)
    line = gemm_line(spec, profile)
    costs = [iteration_cost(spec, profile, placement, loads["tokens"][x], loads["decode"][x],
                            loads["kv_read"][x], loads["rows"][x], line)
             for x in range(len(steps))]
    times = [c.total_s for c in costs]
    ramp_s, drain_s = sum(times[:num_ramp]), sum(times[num_ramp:num_ramp + len(drain)])
    # The steady iteration when there is one, else the fullest of a short job.
    ref = len(steps) - 1 if num_steady else int(np.argmax(loads["tokens"]))
    steady_s = num_steady * times[ref]
    total_s = ramp_s + steady_s + drain_s
    generated = float((cls.k * cls.g).sum())
    all_tokens = float((cls.k * (cls.p + cls.g)).sum())
    blocks = loads["blocks"][ref]
    return Stage2Prediction(
        total_time_s=total_s, output_tokens_per_s=generated / total_s,
        total_tokens_per_s=all_tokens / total_s, num_iterations=num_adm + g_max - 1,
        num_admission_iterations=num_adm, ramp_up_iterations=num_ramp, ramp_up_s=ramp_s,
        steady_iterations=num_steady, steady_s=steady_s, drain_iterations=g_max - 1,
        drain_s=drain_s, admitted_per_iteration=total_k / num_adm, q_kv=q_kv, q_budget=q_budget,
        tokens_per_steady_iteration=loads["tokens"][ref], kv_blocks_steady=blocks,
        kv_fragmentation=1 - loads["held"][ref] / (blocks * deployment.block_size),
        steady_iteration=costs[ref],
        bottleneck=classify_bottleneck(costs[ref], is_kv_limited))
