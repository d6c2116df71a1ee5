"""Stage 2 as the coordinator runs it: a replay of scheduler.py over groups of identical requests.

The fluid Stage 2 (perf_model_stage2.stage2_predict) admits at a constant rate chosen to fit the
cache and the budget in steady state. The coordinator's scheduler does something else, and this
module replays exactly that, iteration by iteration:

1. running requests, oldest first, get their pending tokens (1 for a decode, the rest of a
   chunked prompt) while the token budget lasts, if their next KV blocks can be had; when blocks
   run out the most recently admitted running request is preempted (blocks freed, back to the
   front of the waiting queue, its prompt + output recomputed later);
2. unless something was preempted, waiting requests are admitted first come first served while
   budget, blocks for their first chunk and the running-sequence cap allow; a prompt longer than
   the budget left is chunked.

All requests of a job arrive before the first iteration (an offline batch), so prompts are
admitted greedily while the cache is empty and the scheduler preempts later if decode growth
outruns the blocks: the replay prices that ramp, the recompute, and the drain.

Requests are tracked as cohorts: members of one class in the same state (admitted together and
never split since) move as one. A long job reaches a periodic steady state; once three consecutive
windows (a whole number of periods, about a request lifetime) repeat load for load, whole windows
are skipped (their requests leave the head of the queue, their time and iterations are added)
until a margin of requests is left, which is replayed to the end with the drain.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

STEADY_WINDOWS = 3
"""How many consecutive windows must repeat load for load before the rest are skipped."""


@dataclass
class Cohort:
    """`count` requests of one class in the same state."""

    cls: int
    count: int
    prompt: int
    gen: int
    out: int = 0
    """Tokens generated so far."""
    computed: int = 0
    """Tokens whose KV is cached (0 while waiting, and again after a preemption)."""
    blocks: int = 0
    """KV blocks each member holds."""

    @property
    def known(self) -> int:
        return self.prompt + self.out

    @property
    def pending(self) -> int:
        return self.known - self.computed

    def split(self, count: int) -> "Cohort":
        """Take `count` members off into a new cohort in the same state."""
        self.count -= count
        return Cohort(self.cls, count, self.prompt, self.gen, self.out, self.computed, self.blocks)

    def same_state(self, other: "Cohort") -> bool:
        return (self.cls, self.out, self.computed, self.blocks) == \
            (other.cls, other.out, other.computed, other.blocks)


@dataclass
class Load:
    """One iteration's work, as the pricing function needs it."""

    tokens: int = 0
    decode: int = 0
    """Sequences computing one token on a cached prefix."""
    paged_rows: int = 0
    """Query rows served by the paged attention (decode rows + rows of continued chunks)."""
    kv_read: float = 0.0
    """KV tokens those rows read (each row reads its causal context)."""
    fresh_sq: float = 0.0
    """Σ l² over fresh sequences (no cached prefix)."""
    fresh_seqs: int = 0
    fresh_tokens: int = 0
    seqs: int = 0
    rows_out: int = 0
    """Sequences that emit a token (an lm_head row)."""
    blocks_used: int = 0
    kv_held: float = 0.0
    """KV tokens held after the iteration (fragmentation = 1 − held / (blocks · b))."""
    admitted: int = 0
    finished: int = 0
    preempted: int = 0
    admission_stop: str = ""
    """Why admission stopped with requests still waiting: budget, kv, seqs (or empty)."""


@dataclass
class ScheduleRun:
    """The replayed job: totals, and per replayed iteration its load and time."""

    total_time_s: float = 0.0
    num_iterations: int = 0
    num_preemptions: int = 0
    num_admission_iterations: int = 0
    stops: dict[str, int] = field(default_factory=lambda: {"budget": 0, "kv": 0, "seqs": 0})
    """Iterations whose admission stopped, by reason, while requests waited (a preemption
    counts as kv)."""
    num_skipped_iterations: int = 0
    first_finish_iteration: int = -1
    last_admission_iteration: int = 0
    loads: list[Load] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    """Per replayed iteration (skipped windows are not listed)."""
    iteration_index: list[int] = field(default_factory=list)
    """The job iteration number of each listed one (skips leave gaps)."""


class _State:
    def __init__(self, waiting: list[Cohort], num_blocks: int, block_size: int, budget: int,
                 max_seqs: int):
        self.waiting: deque[Cohort] = deque(waiting)
        self.running: list[Cohort] = []
        self.free, self.block_size = num_blocks, block_size
        self.budget, self.max_seqs = budget, max_seqs
        self.num_running = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def num_waiting(self) -> int:
        return sum(c.count for c in self.waiting)

    def preempt_tail(self) -> Cohort:
        tail = self.running[-1]
        victim = tail.split(1) if tail.count > 1 else self.running.pop()
        self.free += victim.blocks
        self.num_running -= 1
        victim.computed, victim.blocks = 0, 0
        if self.waiting and self.waiting[0].same_state(victim):
            self.waiting[0].count += 1
        else:
            self.waiting.appendleft(victim)
        return victim


def _schedule_running(st: _State, budget: int, pieces: list, load: Load) -> int:
    i = 0
    while i < len(st.running) and budget > 0:
        c = st.running[i]
        n = min(c.pending, budget)
        new_blocks = st.blocks_for(c.computed + n) - c.blocks
        fit = min(c.count, budget // n)
        if new_blocks > 0:
            fit = min(fit, st.free // new_blocks)
        if fit == 0:  # the first member lacks a block: preempt from the tail, as scheduler.py
            is_self = st.running[-1] is c and c.count == 1
            st.preempt_tail()
            load.preempted += 1
            if is_self:
                break
            continue
        if fit < c.count:
            st.running.insert(i + 1, c.split(c.count - fit))
        st.free -= fit * new_blocks
        c.blocks += new_blocks
        pieces.append((c, n))
        budget -= fit * n
        i += 1
    return budget


def _admit_waiting(st: _State, budget: int, pieces: list, load: Load) -> None:
    while st.waiting and budget > 0 and st.num_running < st.max_seqs:
        head = st.waiting[0]
        n = min(head.pending, budget)
        need = st.blocks_for(n)
        if need > st.free:
            load.admission_stop = "kv"
            return
        take = min(head.count, budget // n, st.free // need, st.max_seqs - st.num_running)
        member = st.waiting.popleft() if take == head.count else head.split(take)
        member.blocks = need
        st.free -= take * need
        st.running.append(member)
        st.num_running += take
        pieces.append((member, n))
        budget -= take * n
        load.admitted += take
    if st.waiting:
        load.admission_stop = "budget" if budget <= 0 else "seqs"


def _account(st: _State, pieces: list, load: Load) -> None:
    """Tally the iteration's work, then advance every scheduled cohort."""
    for c, n in pieces:
        m, start = c.count, c.computed
        load.tokens += m * n
        load.seqs += m
        if start == 0:
            load.fresh_sq += m * n * n
            load.fresh_seqs += m
            load.fresh_tokens += m * n
        else:
            load.paged_rows += m * n
            load.kv_read += m * (n * start + n * (n + 1) / 2)
            load.decode += m if n == 1 else 0
        c.computed += n
        if c.computed == c.known:
            load.rows_out += m
            c.out += 1
    kept: list[Cohort] = []
    for c in st.running:
        if c.out >= c.gen:
            st.free += c.count * c.blocks
            st.num_running -= c.count
            load.finished += c.count
        elif kept and kept[-1].same_state(c):
            kept[-1].count += c.count
        else:
            kept.append(c)
    st.running = kept
    load.blocks_used = sum(c.count * c.blocks for c in kept)
    load.kv_held = sum(c.count * c.computed for c in kept)


def _step(st: _State) -> Load:
    load, pieces = Load(), []
    budget = _schedule_running(st, st.budget, pieces, load)
    if load.preempted == 0:
        _admit_waiting(st, budget, pieces, load)
    elif st.waiting:
        load.admission_stop = "kv"
    _account(st, pieces, load)
    return load


def _steady_window(loads: list[Load], lifetime: int) -> int:
    """The window of a periodic steady state, or 0: the smallest period P (up to two request
    lifetimes) with which the last STEADY_WINDOWS windows of P · ceil(lifetime / P) iterations
    repeat load for load. Equal sums per window are not enough: a job whose requests finish in
    waves 16 iterations apart, judged by 17-iteration windows, can show three windows of one
    extra wave each and be skipped ~6% fast."""
    for period in range(1, 2 * lifetime + 1):
        window = period * -(-lifetime // period)
        span = STEADY_WINDOWS * window
        if span > len(loads):
            continue
        tail = loads[-span:]
        if all(tail[i] == tail[i + period] for i in range(span - period)):
            return window
    return 0


def _skip_windows(st: _State, run: ScheduleRun, lifetime: int) -> None:
    """Skip whole steady windows (see the module docstring): once the ramp-up is over and the
    loads repeat (_steady_window), the windows the waiting requests still fill, but for a
    margin, are counted as copies of the last one."""
    if not st.waiting or run.first_finish_iteration < 0 or \
            run.num_iterations < run.first_finish_iteration + lifetime or \
            (run.num_iterations - run.first_finish_iteration) % lifetime:
        return  # checked once a lifetime: the period search is not free
    window = _steady_window(run.loads, lifetime)
    if not window:
        return
    recent, spent = run.loads[-window:], sum(run.times[-window:])
    done = sum(x.finished for x in recent)
    if done <= 0:
        return
    num_windows = int((st.num_waiting - 2 * done) // done)
    if num_windows < 1:
        return
    remove = num_windows * done
    while remove > 0:
        head = st.waiting[0]
        taken = min(head.count, remove)
        if taken == head.count:
            st.waiting.popleft()
        else:
            head.count -= taken
        remove -= taken
    run.total_time_s += num_windows * spent
    run.num_iterations += num_windows * window
    run.num_skipped_iterations += num_windows * window
    run.num_preemptions += num_windows * sum(x.preempted for x in recent)
    run.num_admission_iterations += num_windows * sum(1 for x in recent if x.admitted)
    for reason in run.stops:
        run.stops[reason] += num_windows * sum(1 for x in recent if x.admission_stop == reason)


def replay(classes: list[tuple[int, int, int]], num_blocks: int, block_size: int,
           token_budget: int, max_num_seqs: int | None,
           price: Callable[[Load], float], skip_steady: bool = True) -> ScheduleRun:
    """Replay a job of (prompt_len, gen_len, count) classes, all waiting at the start, in the
    order given; `price` gives each iteration's seconds. skip_steady=False replays every
    iteration."""
    waiting = [Cohort(c, k, p, g) for c, (p, g, k) in enumerate(classes) if k > 0]
    st = _State(waiting, num_blocks, block_size, token_budget,
                max_num_seqs if max_num_seqs is not None else math.inf)
    lifetime = max(g + -(-p // token_budget) for p, g, _ in classes)
    run = ScheduleRun()
    while st.waiting or st.running:
        load = _step(st)
        if load.tokens == 0:
            raise ValueError("the scheduler cannot make progress: a request needs more KV "
                             "blocks than the cache holds")
        seconds = price(load)
        if load.admitted:
            run.num_admission_iterations += 1
            run.last_admission_iteration = run.num_iterations
        if load.finished and run.first_finish_iteration < 0:
            run.first_finish_iteration = run.num_iterations
        if load.admission_stop:
            run.stops[load.admission_stop] += 1
        run.num_preemptions += load.preempted
        run.total_time_s += seconds
        run.loads.append(load)
        run.times.append(seconds)
        run.iteration_index.append(run.num_iterations)
        run.num_iterations += 1
        if skip_steady:
            _skip_windows(st, run, lifetime)
    return run
