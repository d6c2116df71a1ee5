"""Scheduler behaviour driven by fake step outputs (no services, no model)."""

from __future__ import annotations

import itertools

import pytest

from moelens.errors import InvalidArgument, ResourceExhausted
from moelens.sampling import SamplingParams
from services.coordinator.block_manager import BlockManager
from services.coordinator.request import Request, RequestStatus
from services.coordinator.scheduler import Scheduler, SchedulerConfig

_ids = itertools.count()


def _request(prompt_len: int, max_tokens: int) -> Request:
    seq = next(_ids)
    return Request(request_id=f"r{seq}", seq_id=seq, prompt_ids=[1] * prompt_len,
                   params=SamplingParams(max_tokens=max_tokens), seed=0)


def _scheduler(num_blocks=64, block_size=4, budget=16, **kw) -> Scheduler:
    config = SchedulerConfig(token_budget=budget, max_model_len=4096, **kw)
    return Scheduler(config, BlockManager(num_blocks, block_size))


def _step(s: Scheduler):
    """One iteration with a fake model: every emitting sequence gets token 7."""
    out = s.schedule()
    s.mark_computed(out)
    for item in out.scheduled:
        r = item.request
        if r.num_computed == r.num_tokens:
            r.append_token(7)
            if len(r.output_ids) >= r.params.max_tokens:
                s.finish(r, RequestStatus.FINISHED_LENGTH)
    return out


def _run(s: Scheduler, max_steps=10_000):
    steps = []
    while s.has_work and len(steps) < max_steps:
        steps.append(_step(s))
    assert not s.has_work, "did not drain"
    return steps


def test_budget_respected_and_blocks_conserved():
    s = _scheduler(budget=16)
    requests = [_request(n, 5) for n in (3, 9, 30, 2, 17)]
    for r in requests:
        s.add(r)
    steps = _run(s)
    assert all(out.num_tokens <= 16 for out in steps)
    assert all(len(r.output_ids) == 5 for r in requests)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks and not s.blocks.tables


def test_decode_first_then_prompts():
    s = _scheduler(budget=8)
    first = _request(4, 10)
    s.add(first)
    _step(s)  # prefill of `first`, emits its first token
    late = _request(20, 3)
    s.add(late)
    out = _step(s)
    assert out.scheduled[0].request is first and out.scheduled[0].num_new_tokens == 1
    assert out.scheduled[1].request is late and out.scheduled[1].num_new_tokens == 7


def test_long_prompt_is_chunked():
    s = _scheduler(budget=8)
    r = _request(21, 1)
    s.add(r)
    chunks = [out.scheduled[0].num_new_tokens for out in _run(s)]
    assert chunks == [8, 8, 5]
    assert r.output_ids == [7]


def test_preemption_frees_youngest_and_recomputes():
    # 6 blocks of 4 tokens = 24 tokens of KV; two requests that together need more
    s = _scheduler(num_blocks=6, block_size=4, budget=32)
    old, young = _request(8, 12), _request(8, 12)
    s.add(old)
    s.add(young)
    steps = _run(s)
    preempted = [r for out in steps for r in out.preempted]
    assert preempted and all(r is young for r in preempted)
    assert old.num_preemptions == 0 and young.num_preemptions >= 1
    assert len(old.output_ids) == len(young.output_ids) == 12
    # the recompute step recomputes prompt + generated tokens
    recompute = next(o for o in steps[steps.index(next(o for o in steps if o.preempted)) + 1:]
                     if any(x.request is young for x in o.scheduled))
    item = next(x for x in recompute.scheduled if x.request is young)
    assert item.num_new_tokens > len(young.prompt_ids)
    assert s.blocks.num_free_blocks == 6


def test_no_starvation_under_arrivals():
    s = _scheduler(num_blocks=32, block_size=4, budget=12, max_num_seqs=4)
    first = _request(10, 20)
    s.add(first)
    for step in range(200):
        if step % 2 == 0:
            s.add(_request(6, 4))
        _step(s)
        if first.status.is_finished:
            break
    assert first.status == RequestStatus.FINISHED_LENGTH and step < 40


def test_oversize_and_overload_rejected():
    s = _scheduler(num_blocks=4, block_size=4, max_waiting=2)
    with pytest.raises(InvalidArgument, match="whole cache holds 16"):
        s.add(_request(10, 10))
    s.add(_request(2, 2))
    s.add(_request(2, 2))
    with pytest.raises(ResourceExhausted, match="max-waiting 2"):
        s.add(_request(2, 2))


def test_prompt_longer_than_context_rejected():
    s = Scheduler(SchedulerConfig(max_model_len=16), BlockManager(64, 4))
    with pytest.raises(InvalidArgument, match="context is 16"):
        s.add(_request(16, 1))


def test_invalid_config_names_flag():
    with pytest.raises(ValueError, match="--token-budget"):
        SchedulerConfig(token_budget=0)


def test_final_only_request_publishes_one_token_event_before_the_end():
    from services.coordinator.request import FinishEvent, TokenEvent
    delta, final = _request(4, 8), _request(4, 8)
    final.final_only = True
    for r in (delta, final):
        r.publish(TokenEvent([5], "a", [-0.5]))
        r.publish(TokenEvent([6], "b", [-0.25]))
    assert final.events.empty() and delta.events.qsize() == 2
    final.finish(RequestStatus.FINISHED_LENGTH)
    held, end = final.events.get_nowait(), final.events.get_nowait()
    assert (held.token_ids, held.text, held.logprobs) == ([5, 6], "ab", [-0.5, -0.25])
    assert end == FinishEvent("length") and final.events.empty()
    failed = _request(4, 8)
    failed.final_only = True
    failed.publish(TokenEvent([9]))
    failed.publish(RuntimeError("expert died"))
    assert failed.events.get_nowait().token_ids == [9]
    assert isinstance(failed.events.get_nowait(), RuntimeError)
