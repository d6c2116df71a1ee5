"""The MoE-Lens performance model ("the Lens"): Stage 1 bound, token budget, and `predict`.

Entry points for the coordinator and the CLI:

    spec = ModelSpec.from_config(cfg, weight_bytes=4)
    token_budget(spec, profile, deployment) -> int          # n_real, the scheduler's budget
    predict(spec, profile, workload, deployment) -> Prediction

Equations (paper arXiv 2504.09345, docs/performance-model.md):
    Eq. 2  n ≥ (C_GPU / B_IO) · (N_e / N_k)        tokens per iteration that hide the weight stream
    Eq. 3  PME = (p + g) / Σ_{j=0..g} (p + j) ≈ 2(p + g) / ((2p + g) · g)
    Eq. 4  T_max = min(PME · M / δ, T_GPU),  turning point M* = n_real / PME
Stage 2 (finite jobs) is in perf_model_stage2.py (constant-rate admission, the paper's form) and
perf_model_scheduled.py (a replay of the coordinator's scheduler, perf_model_schedule.py);
iteration pricing in perf_model_iteration.py. `moe-lens bench validate` compares the replay
with the running system.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from moelens.profile import HardwareProfile
from services.coordinator.perf_model_iteration import (BOTTLENECKS, IterationCost, Placement,
                                                       classify_bottleneck, gemm_line,
                                                       iteration_cost, place_weights)
from services.coordinator.perf_model_scheduled import stage2_scheduled
from services.coordinator.perf_model_stage2 import Stage2Prediction, stage2_predict
from services.coordinator.perf_model_types import (Deployment, ModelSpec, StepOverheads, Workload,
                                                   dtype_bytes)

__all__ = ["BOTTLENECKS", "Deployment", "HardwareProfile", "IterationCost", "ModelSpec",
           "Placement", "Prediction", "Stage1Bound", "Stage2Prediction", "StepOverheads",
           "TokenBudget", "Workload", "budget_breakdown", "dtype_bytes", "eq2_token_threshold",
           "iteration_cost", "pme", "pme_exact", "place_weights", "predict", "stage1_bound",
           "stage2_predict", "stage2_scheduled", "token_budget", "with_kv_bytes",
           "workload_pme"]

INTERCEPT_FRACTION = 0.02
"""With no weight stream to hide, the budget is where the iteration's fixed part is ≤ 2%. At 5%
the bench-mixtral job (256 requests, p 128, g 64) ran at budgets of 580-990 tokens in 115-138
steps; at 2048 in 81, with ~0.3 s less exchange and ~0.3 s less per-step overhead, and faster in
both of two alternated rounds (435 vs 411, 394 vs 377 output tok/s, session 18)."""
MIN_TOKEN_BUDGET = 256
"""Floor of the budget (below the KV capacity and max_num_tokens): a GEMM line measured on a busy
machine can come out with no intercept at all, and a budget of a few tokens then chunks every
prompt into dozens of iterations, each paying the per-step costs no kernel profile sees."""


def pme(prompt_len: float, gen_len: float) -> float:
    """Eq. 3 (the paper's closed form): 2(p + g) / ((2p + g) · g)."""
    return 2.0 * (prompt_len + gen_len) / ((2.0 * prompt_len + gen_len) * gen_len)


def pme_exact(prompt_len: int, gen_len: int) -> float:
    """Eq. 3 before the approximation: (p + g) / Σ_{j=0..g} (p + j)."""
    return (prompt_len + gen_len) / ((gen_len + 1) * prompt_len + gen_len * (gen_len + 1) / 2)


def workload_pme(workload: Workload) -> float:
    """PME of a mix: all tokens processed / all KV token-iterations held (Eq. 3 per class)."""
    classes = workload.classes()
    tokens = sum(k * (p + g) for p, g, k in classes)
    return tokens / sum(k * (p + g) / pme(p, g) for p, g, k in classes)


def decode_share(workload: Workload) -> float:
    """Fraction of processed tokens that are decode tokens (the rest are prompt tokens)."""
    classes = workload.classes()
    return sum(k * g for p, g, k in classes) / sum(k * (p + g) for p, g, k in classes)


def eq2_token_threshold(gemm_flops_per_s: float, io_bandwidth_bytes_per_s: float,
                        num_experts: int, top_k: int, weight_bytes: int = 2) -> float:
    """Eq. 2: tokens per iteration at which expert GEMMs take as long as streaming their weights.

    Each streamed parameter (weight_bytes bytes) serves top_k/num_experts of the n tokens at
    2 FLOPs each, so compute = IO when n = (C / B_IO) · (N_e / N_k) · (weight_bytes / 2);
    the paper's form has 2-byte weights.
    """
    return gemm_flops_per_s / io_bandwidth_bytes_per_s * num_experts / top_k * weight_bytes / 2


@dataclass(frozen=True)
class TokenBudget:
    """How n_real was chosen (see `budget_breakdown`)."""

    n_io: float
    """Eq. 2 via the GEMM line: tokens whose GEMMs last as long as the weight stream (0: none)."""
    n_amortise: float
    """Tokens at which the GEMM line's intercept is INTERCEPT_FRACTION of the GEMM time."""
    n_target: int
    """min(max(n_io, n_amortise), max_num_tokens): the budget the hardware wants (the services
    size their buffers for max_num_tokens). The turning point M* = n_target / PME."""
    kv_capacity_tokens: int
    n_real: int
    """min(n_target, KV capacity): more tokens than the cache holds cannot be fed in one step."""


def budget_breakdown(spec: ModelSpec, profile: HardwareProfile, deployment: Deployment,
                     overheads: StepOverheads | None = None) -> TokenBudget:
    """n_real = min(max(n_io, n_amortise, MIN_TOKEN_BUDGET), max_num_tokens, M), at least 1.

    n_io = (δ − A) / B solves A + B·n = δ for the iteration's GEMM line A + B·n and stream time δ
    (Eq. 2 with a measured line instead of peak FLOP/s). With all weights resident δ = 0 and
    Eq. 2 says nothing, so the budget is where the fixed cost F is amortised:
    F ≤ f·(F + B·n) ⇔ n ≥ F(1 − f)/(f·B), f = 2% (throughput within 2% of the asymptote), where
    F = A + L·(exchange fixed) [+ the step's fixed overhead when known]: every iteration pays
    one activation exchange per layer whatever its size. Taking the larger of the two means: the
    weight stream is hidden *and* the fixed part is amortised. The lm_head rows are left out
    (they depend on the workload and are small).
    """
    placement = place_weights(spec, deployment)
    line = gemm_line(spec, profile)
    delta = placement.streamed_bytes / profile.io_bandwidth_bytes_per_s
    n_io = max(0.0, (delta - line.intercept_s) / line.slope_s_per_token)
    fixed = line.intercept_s + spec.num_layers * profile.exchange_fixed_s \
        + (overheads.step_fixed_s if overheads else 0.0)
    f = INTERCEPT_FRACTION
    n_amortise = fixed * (1 - f) / (f * line.slope_s_per_token)
    wanted = max(math.ceil(max(n_io, n_amortise)), MIN_TOKEN_BUDGET)
    n_target = max(1, min(wanted, deployment.max_num_tokens))
    capacity = deployment.kv_capacity_tokens(spec)
    return TokenBudget(n_io, n_amortise, n_target, capacity, max(1, min(n_target, capacity)))


def token_budget(spec: ModelSpec, profile: HardwareProfile, deployment: Deployment,
                 overheads: StepOverheads | None = None) -> int:
    """n_real: tokens per iteration the scheduler should fill (see `budget_breakdown`)."""
    return budget_breakdown(spec, profile, deployment, overheads).n_real


@dataclass(frozen=True)
class Stage1Bound:
    """The steady-state hardware bound (T counts prompt + generated tokens per second)."""

    pme: float
    kv_capacity_tokens: int
    """M."""
    delta_s: float
    """δ: seconds to stream the non-resident weights once."""
    n_real: int
    """The scheduler's token budget at this M (see TokenBudget)."""
    turning_point_tokens: float
    """M* = n_target / PME: KV capacity beyond which more KV adds nothing."""
    turning_point_bytes: float
    t_gpu: float
    """Accelerator-bound rate: n_target / max(δ, GEMM(n_target))."""
    t_max: float
    """Eq. 4: min(PME · M / δ, T_GPU)."""
    throughput: float
    """Eq. 4 extended: n / iteration time with n = min(PME·M, n_real), pricing the GEMM
    intercept, CPU attention, activation exchange and host-memory contention."""
    iteration: IterationCost
    bottleneck: str


def stage1_bound(spec: ModelSpec, profile: HardwareProfile, workload: Workload,
                 deployment: Deployment) -> Stage1Bound:
    """Stage 1 at the deployment's KV capacity M.

    In steady state KV holds n/PME tokens when n tokens are processed per iteration, and decode
    attention reads all of it once; n·(decode share) rows emit a token (lm_head).
    """
    placement = place_weights(spec, deployment)
    budget = budget_breakdown(spec, profile, deployment)
    efficiency, share = workload_pme(workload), decode_share(workload)
    m = deployment.kv_capacity_tokens(spec)
    delta = placement.streamed_bytes / profile.io_bandwidth_bytes_per_s
    n = min(efficiency * m, budget.n_target)

    def cost(tokens: float) -> IterationCost:
        return iteration_cost(spec, profile, placement, tokens, tokens * share,
                              tokens / efficiency, tokens * share)

    at_budget, at_m = cost(budget.n_target), cost(n)
    t_gpu = budget.n_target / max(delta, at_budget.gemm_s)
    t_capacity = efficiency * m / delta if delta > 0 else math.inf
    turning = budget.n_target / efficiency
    return Stage1Bound(
        pme=efficiency, kv_capacity_tokens=m, delta_s=delta, n_real=budget.n_real,
        turning_point_tokens=turning, turning_point_bytes=turning * spec.kv_bytes_per_token,
        t_gpu=t_gpu, t_max=min(t_capacity, t_gpu), throughput=n / at_m.total_s,
        iteration=at_m, bottleneck=classify_bottleneck(at_m, n < budget.n_target))


@dataclass(frozen=True)
class Prediction:
    """Everything `predict` says about one job on one deployment."""

    stage1: Stage1Bound
    stage2: Stage2Prediction
    """The job under constant-rate admission of q prompts per iteration (perf_model_stage2): the
    paper's Stage 2, which converges to Stage 1 as the job grows."""
    stage2_scheduled: Stage2Prediction | None
    """With predict(..., replay=True): the job as the coordinator's scheduler runs it
    (perf_model_scheduled): greedy FCFS admission under the token budget, chunked prefill,
    preemption with recompute, and the system's StepOverheads. What `moe-lens bench validate`
    compares with measurement. In a KV-bound steady state it falls short of stage2 by what
    preemption recomputes."""
    placement: Placement
    n_real: int
    bottleneck: str
    """Stage 2's steady-state bottleneck (one of BOTTLENECKS)."""
    host_memory_demand_bytes_per_s: float
    """Host memory traffic of a steady iteration / its uncontended time (the paper's B_mem)."""
    is_host_memory_contended: bool
    """Demand exceeds the host's bandwidth: streaming and attention stretch each other."""


def predict(spec: ModelSpec, profile: HardwareProfile, workload: Workload,
            deployment: Deployment, overheads: StepOverheads | None = None,
            replay: bool = False) -> Prediction:
    """Stage 1 bound + Stage 2 finite-job prediction; ValueError for impossible deployments.

    `overheads`: the serving system's per-iteration costs outside the profiled kernels (see
    StepOverheads); None prices the kernels alone. `replay`: also replay the job through the
    scheduler's rules (stage2_scheduled); its Python cost grows with requests × iterations
    (~0.2 s for 256 mixed requests, seconds for thousands on a small cache), too much for a
    loop that must not stall, such as the coordinator's engine."""
    placement = place_weights(spec, deployment)
    n_real = deployment.token_budget or token_budget(spec, profile, deployment, overheads)
    stage1 = stage1_bound(spec, profile, workload, deployment)
    stage2 = stage2_predict(spec, profile, workload, deployment, placement, n_real)
    scheduled = stage2_scheduled(spec, profile, workload, deployment, placement, n_real,
                                 overheads) if replay else None
    it = stage2.steady_iteration
    uncontended = max(it.io_s, it.compute_s)
    demand = it.host_memory_bytes / uncontended if uncontended > 0 else 0.0
    return Prediction(stage1=stage1, stage2=stage2, stage2_scheduled=scheduled,
                      placement=placement, n_real=n_real,
                      bottleneck=stage2.bottleneck, host_memory_demand_bytes_per_s=demand,
                      is_host_memory_contended=demand > profile.host_memory_bandwidth_bytes_per_s)


def with_kv_bytes(deployment: Deployment, kv_cache_bytes: int) -> Deployment:
    """The same deployment with another KV budget (for sweeps)."""
    return dataclasses.replace(deployment, kv_cache_bytes=kv_cache_bytes)
