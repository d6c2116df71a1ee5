"""Stage 2 priced over the scheduler's replay (perf_model_schedule): what `predict` reports.

Every replayed iteration is priced by iteration_cost with its full load (fresh prompts' causal
attention, paged rows of decodes and continued chunks, emitted rows, sequences) and the
system's StepOverheads. Ramp-up is the iterations before the first request finishes, drain the
ones after the last admission; the bottleneck is named from the fullest iteration of the steady
part (or of the whole job when it has none) and from why admission stopped while requests
waited (blocks: kv_capacity).
"""

from __future__ import annotations

import numpy as np

from moelens.profile import HardwareProfile
from services.coordinator import perf_model_stage2
from services.coordinator.perf_model_iteration import (Placement, StepLoad, classify_bottleneck,
                                                       gemm_line, iteration_cost)
from services.coordinator.perf_model_schedule import Load, ScheduleRun, replay
from services.coordinator.perf_model_stage2 import Stage2Prediction
from services.coordinator.perf_model_types import (Deployment, ModelSpec, StepOverheads,
                                                   Workload)

COMPONENTS = ("gemm", "prefill_attention", "attention", "exchange", "overhead", "io")
"""IterationCost parts summed over the job (their sum exceeds the time where they overlap)."""
ARRIVAL_ROUNDS = 8
"""A mix is queued as this many rounds of all its classes, so classes interleave in arrival
order roughly as a shuffled job's would (one cohort per class per round)."""


def _queue(workload: Workload) -> list[tuple[int, int, int]]:
    """(p, g, count) cohorts in arrival order: binned classes, interleaved over rounds."""
    rows = perf_model_stage2._binned(workload.classes(), perf_model_stage2.MAX_CLASSES)
    if len(rows) == 1:
        return rows
    rounds = max(1, min(ARRIVAL_ROUNDS, min(k for _, _, k in rows)))
    queue = []
    for r in range(rounds):
        for p, g, k in rows:
            share = k // rounds + (1 if r < k % rounds else 0)
            if share:
                queue.append((p, g, share))
    return queue


def _cost(spec, profile, placement, line, overheads, load: Load):
    return iteration_cost(spec, profile, placement, load.tokens, load.decode, load.kv_read,
                          load.rows_out, line,
                          StepLoad(num_paged_rows=load.paged_rows, fresh_sq_tokens=load.fresh_sq,
                                   num_fresh_seqs=load.fresh_seqs,
                                   num_fresh_tokens=load.fresh_tokens, num_seqs=load.seqs),
                          overheads)


def _phase_split(run: ScheduleRun) -> tuple[list[int], list[int], list[int]]:
    """Indices of replayed iterations in ramp-up, steady and drain."""
    ramp_end = run.first_finish_iteration if run.first_finish_iteration >= 0 \
        else run.num_iterations
    drain_start = max(ramp_end, run.last_admission_iteration + 1)
    ramp, steady, drain = [], [], []
    for x, it in enumerate(run.iteration_index):
        (ramp if it < ramp_end else drain if it >= drain_start else steady).append(x)
    return ramp, steady, drain


def stage2_scheduled(spec: ModelSpec, profile: HardwareProfile, workload: Workload,
                     deployment: Deployment, placement: Placement, n_real: int,
                     overheads: StepOverheads | None = None) -> Stage2Prediction:
    """Replay the job through the scheduler's rules and price each iteration.

    The budget is deployment.token_budget when the coordinator's is known, else n_real."""
    num_blocks = perf_model_stage2._check_fits(workload, spec, deployment)
    budget = deployment.token_budget or n_real
    line = gemm_line(spec, profile)
    parts = dict.fromkeys(COMPONENTS, 0.0)

    def price(load: Load) -> float:
        cost = _cost(spec, profile, placement, line, overheads, load)
        for name in COMPONENTS:
            parts[name] += getattr(cost, f"{name}_s")
        return cost.total_s

    run = replay(_queue(workload), num_blocks, deployment.block_size, budget,
                 deployment.max_num_seqs, price)
    ramp, steady, drain = _phase_split(run)
    pool = steady or list(range(len(run.loads)))
    ref = max(pool, key=lambda x: run.loads[x].tokens)
    ref_load = run.loads[ref]
    ref_cost = _cost(spec, profile, placement, line, overheads, ref_load)
    replayed_s = sum(run.times)
    skipped_s = run.total_time_s - replayed_s
    scale = run.total_time_s / replayed_s if replayed_s > 0 else 1.0
    steady_s = sum(run.times[x] for x in steady) + skipped_s
    total_s = run.total_time_s
    cls = perf_model_stage2._classes(workload, deployment.block_size)
    q_kv, q_budget = perf_model_stage2._admission_rate(cls, num_blocks, budget)
    generated = float((cls.k * cls.g).sum())
    all_tokens = float((cls.k * (cls.p + cls.g)).sum())
    stops = run.stops
    is_kv_limited = stops["kv"] > 0 and stops["kv"] >= max(stops["budget"], stops["seqs"])
    allocated = ref_load.blocks_used * deployment.block_size
    num_ramp = len(ramp)
    num_drain = len(drain)
    return Stage2Prediction(
        total_time_s=total_s, output_tokens_per_s=generated / total_s,
        total_tokens_per_s=all_tokens / total_s, num_iterations=run.num_iterations,
        num_admission_iterations=run.num_admission_iterations,
        ramp_up_iterations=num_ramp, ramp_up_s=float(sum(run.times[x] for x in ramp)),
        steady_iterations=run.num_iterations - num_ramp - num_drain, steady_s=steady_s,
        drain_iterations=num_drain, drain_s=float(sum(run.times[x] for x in drain)),
        admitted_per_iteration=workload.num_requests / max(1, run.num_admission_iterations),
        q_kv=q_kv, q_budget=q_budget, tokens_per_steady_iteration=float(ref_load.tokens),
        kv_blocks_steady=float(ref_load.blocks_used),
        kv_fragmentation=float(1 - ref_load.kv_held / allocated) if allocated else 0.0,
        steady_iteration=ref_cost, bottleneck=classify_bottleneck(ref_cost, is_kv_limited),
        num_preemptions=run.num_preemptions, token_budget=budget,
        mean_tokens_per_iteration=float(np.sum(cls.k * (cls.p + cls.g - 1))) /
        max(1, run.num_iterations),
        components_s={name: value * scale for name, value in parts.items()})
