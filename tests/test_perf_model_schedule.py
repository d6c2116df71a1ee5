"""The performance model's scheduler replay against the coordinator's real Scheduler.

The replay (services/coordinator/perf_model_schedule.py) groups identical requests into cohorts;
the reference here drives the real Scheduler and BlockManager one request at a time, with a fake
step that emits a token whenever a sequence's known tokens are all computed (what the engine
does with greedy, ignore_eos, min_tokens = max_tokens requests). Every iteration must match.
"""

from __future__ import annotations

import pytest

from moelens.sampling import SamplingParams
from perf_specs import default_spec_and_profile
from services.coordinator.block_manager import BlockManager
from services.coordinator.perf_model_schedule import Load, replay
from services.coordinator.request import Request, RequestStatus
from services.coordinator.scheduler import Scheduler, SchedulerConfig


def _reference(classes, num_blocks, block_size, budget, max_seqs):
    """Per iteration (tokens, seqs, paged rows, KV read, fresh Σl², emitted, preempted,
    blocks used) from the real scheduler."""
    sched = Scheduler(SchedulerConfig(token_budget=budget, max_num_seqs=max_seqs or 10 ** 6,
                                      max_waiting=10 ** 6, max_model_len=10 ** 6),
                      BlockManager(num_blocks, block_size))
    seq = 0
    for p, g, k in classes:
        for _ in range(k):
            sched.add(Request(f"r{seq}", seq, [1] * p, SamplingParams(
                max_tokens=g, min_tokens=g, temperature=0.0, ignore_eos=True), seed=0))
            seq += 1
    out = []
    while sched.has_work:
        plan = sched.schedule()
        row = dict(tokens=plan.num_tokens, seqs=len(plan.scheduled), paged=0, kv=0.0,
                   fresh=0.0, emitted=0, preempted=len(plan.preempted))
        for s in plan.scheduled:
            start, n = s.request.num_computed, s.num_new_tokens
            if start == 0:
                row["fresh"] += n * n
            else:
                row["paged"] += n
                row["kv"] += n * start + n * (n + 1) / 2
            row["emitted"] += s.is_emitting
        sched.mark_computed(plan)
        for s in plan.scheduled:
            r = s.request
            if r.num_computed == r.num_tokens:
                r.output_ids.append(0)
                if len(r.output_ids) >= r.params.max_tokens:
                    sched.finish(r, RequestStatus.FINISHED_LENGTH)
        row["blocks"] = sched.blocks.num_used_blocks
        out.append(row)
    return out


def _as_row(load: Load) -> dict:
    return dict(tokens=load.tokens, seqs=load.seqs, paged=load.paged_rows, kv=load.kv_read,
                fresh=load.fresh_sq, emitted=load.rows_out, preempted=load.preempted,
                blocks=load.blocks_used)


@pytest.mark.parametrize("classes,num_blocks,block_size,budget,max_seqs", [
    ([(32, 16, 40)], 10_000, 16, 512, None),           # compute-bound: budget sets admission
    ([(128, 64, 30)], 10_000, 16, 300, None),          # prompts chunked across iterations
    ([(128, 64, 30)], 40, 16, 1024, None),             # KV-bound: greedy admission, preemption
    ([(64, 32, 50)], 10_000, 16, 1024, 8),             # the running-sequence cap binds
    ([(20, 9, 7), (70, 3, 5), (5, 30, 9)], 30, 4, 64, 6),  # a mix, everything binding
    ([(97, 40, 25)], 23, 8, 200, None),                # odd sizes, heavy preemption
])
def test_replay_matches_real_scheduler(classes, num_blocks, block_size, budget, max_seqs):
    run = replay(classes, num_blocks, block_size, budget, max_seqs, price=lambda load: 1.0,
                 skip_steady=False)
    reference = _reference(classes, num_blocks, block_size, budget, max_seqs)
    assert run.num_skipped_iterations == 0
    assert [_as_row(x) for x in run.loads] == reference
    assert run.num_iterations == len(reference)
    assert run.num_preemptions == sum(r["preempted"] for r in reference)


@pytest.mark.parametrize("classes,num_blocks,budget,max_seqs,skips", [
    ([(128, 16, 3000)], 4096, 512, 24, True),   # waves 16 iterations apart, lifetime 17
    ([(128, 16, 300)], 4096, 512, 24, False),   # too short to skip (was skipped 4% fast)
    ([(64, 32, 3000)], 10_000, 1024, 8, True),  # the running-sequence cap binds
    ([(48, 24, 3000)], 400, 16 * 16, None, False),  # KV-bound, preempting: never periodic
])
def test_steady_windows_are_skipped_only_when_they_repeat(classes, num_blocks, budget,
                                                           max_seqs, skips):
    """A long periodic job skips its steady windows and still gets the exact time and
    iteration count; one that does not repeat load for load is replayed to the end."""
    def price(load: Load) -> float:
        return 0.01 + 1e-5 * load.tokens + 1e-8 * load.kv_read

    run = replay(classes, num_blocks, 16, budget, max_seqs, price)
    exact_steps = _reference(classes, num_blocks, 16, budget, max_seqs)
    exact = sum(0.01 + 1e-5 * r["tokens"] + 1e-8 * r["kv"] for r in exact_steps)
    assert (run.num_skipped_iterations > 0) == skips
    assert run.num_iterations == len(exact_steps)
    assert run.total_time_s == pytest.approx(exact, rel=1e-9)
    assert run.num_preemptions == sum(r["preempted"] for r in exact_steps)


def test_request_longer_than_cache_cannot_progress():
    with pytest.raises(ValueError, match="cannot make progress"):
        replay([(100, 10, 1)], 4, 16, 512, None, price=lambda load: 1.0)


# The model around the replay ----------------------------------------------------------------------

def test_budget_survives_a_profile_with_no_intercept():
    from services.coordinator.perf_model import MIN_TOKEN_BUDGET, Deployment, token_budget
    spec, profile = default_spec_and_profile(gemm_intercept_s=0.0, exchange_fixed_s=0.0)
    deployment = Deployment(kv_cache_bytes=2 ** 27)
    assert token_budget(spec, profile, deployment) == MIN_TOKEN_BUDGET
    # the exchange's fixed cost per layer counts as fixed cost of the iteration
    spec, with_exchange = default_spec_and_profile(gemm_intercept_s=0.0, exchange_fixed_s=1e-2)
    assert token_budget(spec, with_exchange, deployment) > MIN_TOKEN_BUDGET


def test_fixed_budget_and_seq_cap_reach_the_replay():
    from dataclasses import replace

    from services.coordinator.perf_model import Deployment, Workload, predict
    spec, profile = default_spec_and_profile()
    deployment = Deployment(kv_cache_bytes=2 ** 27, token_budget=64, max_num_seqs=4)
    pred = predict(spec, profile, Workload(32, 8, 12), deployment, replay=True)
    assert pred.n_real == 64 and pred.stage2_scheduled.token_budget == 64
    num_blocks = deployment.kv_capacity_tokens(spec) // deployment.block_size
    assert pred.stage2_scheduled.num_iterations == len(_reference([(32, 8, 12)], num_blocks, 16,
                                                                  64, 4))
    free = predict(spec, profile, Workload(32, 8, 12), replace(deployment, max_num_seqs=None),
                   replay=True)
    assert free.stage2_scheduled.num_iterations < pred.stage2_scheduled.num_iterations
    assert predict(spec, profile, Workload(32, 8, 12), deployment).stage2_scheduled is None


def test_small_iterations_read_only_the_experts_picked():
    from services.coordinator.perf_model_iteration import gemm_line
    spec, profile = default_spec_and_profile()
    line = gemm_line(spec, profile)
    assert line.seconds_at(0) == 0.0
    n = 10_000
    assert line.seconds_at(n) == pytest.approx(line.intercept_s + line.slope_s_per_token * n)
    # one token picks 2 of 8 experts: 3/4 of the experts' share of the intercept is not paid
    one = line.intercept_s - 0.75 * line.expert_intercept_s + line.slope_s_per_token
    assert line.seconds_at(1) == pytest.approx(one)
    assert line.seconds_at(1) < line.seconds_at(4) < line.seconds_at(32)


def test_measured_curve_prices_the_profiled_layer_at_its_points():
    """With a curve, a one-layer model shaped like the profiled layer costs what was measured at
    each timed count, and in between lies between its neighbours."""
    from dataclasses import replace

    from services.coordinator.perf_model_iteration import gemm_line
    spec, profile = default_spec_and_profile()
    one_layer = replace(spec, num_layers=1, layer_attention_bytes=spec.layer_attention_bytes[:1],
                        layer_mlp_bytes=spec.layer_mlp_bytes[:1],
                        layer_flops_per_token=spec.layer_flops_per_token[:1])
    assert one_layer.layer_weight_bytes(0) == pytest.approx(profile.gemm_layer_weight_bytes)
    a, b = profile.gemm_intercept_s, profile.gemm_slope_s_per_token
    tokens = (1, 4, 32, 256)
    seconds = (0.4 * a, 0.6 * a, a + b * 32 * 1.1, a + b * 256)  # bends below the line at 1 and 4
    curved = replace(profile, gemm_curve_tokens=tokens, gemm_curve_s=seconds)
    line = gemm_line(one_layer, curved)
    for n, t in zip(tokens, seconds):
        assert line.seconds_at(n) == pytest.approx(t)
    assert seconds[1] < line.seconds_at(16) < seconds[2]
    # beyond the last point the ratio stays at its end value (1 here: the line itself)
    assert line.seconds_at(4096) == pytest.approx(a + b * 4096)
    # the whole model scales the same curve; no curve keeps the pick-fraction correction
    full = gemm_line(spec, curved)
    assert full.seconds_at(1) == pytest.approx(
        0.4 * a / (a + b) * (full.intercept_s + full.slope_s_per_token))
    assert gemm_line(spec, profile).seconds_at(1) != pytest.approx(line.seconds_at(1))


def test_exchange_latency_hides_behind_fresh_prompts_causal_attention_on_accelerators():
    """On an accelerator host the exchange's fixed part is priced only where the layer's
    prefill attention (run between sending q/k/v and waiting for o) leaves it uncovered; on a
    CPU-only host that attention waits for o (the services take turns on the cores), so nothing
    is hidden. The per-byte part is priced always."""
    from dataclasses import replace

    from services.coordinator.perf_model import (Deployment, StepOverheads, iteration_cost,
                                                 place_weights)
    from services.coordinator.perf_model_iteration import StepLoad
    spec, cpu_profile = default_spec_and_profile()
    cpu_profile = replace(cpu_profile, exchange_fixed_s=1e-3, exchange_s_per_byte=1e-9,
                          is_accelerator_separate=False)
    gpu_profile = replace(cpu_profile, is_accelerator_separate=True)
    placement = place_weights(spec, Deployment(kv_cache_bytes=2 ** 27))
    over = StepOverheads(exchange_fixed_scale=2.0, exchange_byte_scale=0.5)
    moved = 64 * 2 * spec.kv_size * spec.activation_bytes  # 64 prompt tokens, no paged rows
    bytes_part = spec.num_layers * 0.5 * 1e-9 * moved

    def exchange(profile, prefill_per_layer: float) -> float:
        o = replace(over, prefill_attention_s_per_seq=prefill_per_layer)
        load = StepLoad(num_paged_rows=0, num_fresh_seqs=1, num_fresh_tokens=64)
        return iteration_cost(spec, profile, placement, 64, 0, 0, 1, load=load,
                              overheads=o).exchange_s

    latency = spec.num_layers * 2e-3
    assert exchange(gpu_profile, 0.0) == pytest.approx(latency + bytes_part)
    assert exchange(gpu_profile, 0.5e-3) == pytest.approx(spec.num_layers * 1.5e-3 + bytes_part)
    assert exchange(gpu_profile, 5e-3) == pytest.approx(bytes_part)  # wholly hidden
    for prefill in (0.0, 0.5e-3, 5e-3):
        assert exchange(cpu_profile, prefill) == pytest.approx(latency + bytes_part)
    with pytest.raises(ValueError, match="exchange_fixed_scale"):
        StepOverheads(exchange_fixed_scale=0.0)
    with pytest.raises(ValueError, match="exchange_byte_scale"):
        StepOverheads(exchange_byte_scale=-1.0)


def test_step_overheads_add_per_iteration_and_per_sequence():
    from services.coordinator.perf_model import Deployment, StepOverheads, Workload, predict
    spec, profile = default_spec_and_profile()
    deployment = Deployment(kv_cache_bytes=2 ** 27, token_budget=512)
    bare = predict(spec, profile, Workload(16, 8, 4), deployment, replay=True).stage2_scheduled
    over = StepOverheads(step_fixed_s=0.01, step_s_per_seq=0.001)
    paid = predict(spec, profile, Workload(16, 8, 4), deployment, over,
                   replay=True).stage2_scheduled
    # 8 iterations of 4 sequences each
    assert paid.total_time_s - bare.total_time_s == pytest.approx(8 * (0.01 + 4 * 0.001))
    with pytest.raises(ValueError, match="step_fixed_s"):
        StepOverheads(step_fixed_s=-1.0)
