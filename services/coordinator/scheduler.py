"""The scheduler: hands out a token budget per iteration, in token counts, not phases.

Each request has tokens computed and tokens known; every iteration:
1. running requests, oldest first, get what they need (1 for decode, the rest of a chunked
   prompt up to the budget) if their next KV blocks can be had; when blocks run out, the most
   recently admitted running request is preempted (blocks freed, re-queued at the front of the
   waiting queue for recompute), so older requests always progress;
2. then waiting requests, first come first served, until the budget is used; a prompt longer
   than what is left of the budget is chunked ("fewer tokens this step").
A request that alone needs more KV than the whole cache is refused when it arrives, so nothing
can deadlock waiting for blocks that will never exist.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from moelens.errors import InvalidArgument, ResourceExhausted
from services.coordinator.block_manager import BlockManager
from services.coordinator.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    token_budget: int = 2048
    """Tokens per iteration (n_real from the performance model, or the flag)."""
    max_num_seqs: int = 256
    """Running requests at most."""
    max_waiting: int = 4096
    """Waiting requests at most; beyond it new requests get RESOURCE_EXHAUSTED."""
    max_model_len: int = 4096
    """Context length of the model."""

    def __post_init__(self) -> None:
        for name in ("token_budget", "max_num_seqs", "max_waiting", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int
    block_table: list[int]

    @property
    def is_emitting(self) -> bool:
        """After this step every known token is computed: sample the next one."""
        return self.request.num_computed + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config, self.blocks = config, blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: oldest first
        self.num_preemptions = 0

    # Admission ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        prompt_len, cfg = len(request.prompt_ids), self.config
        if prompt_len >= cfg.max_model_len:
            raise InvalidArgument(f"prompt has {prompt_len} tokens; the model's context is "
                                  f"{cfg.max_model_len}, leaving no room to generate")
        need = min(prompt_len + request.params.max_tokens, cfg.max_model_len)
        if need > self.blocks.capacity_tokens:
            raise InvalidArgument(
                f"prompt + max_tokens needs {need} KV tokens but the whole cache holds "
                f"{self.blocks.capacity_tokens}; lower max_tokens or raise --kv-cache-gb")
        if len(self.waiting) >= cfg.max_waiting:
            raise ResourceExhausted(f"{len(self.waiting)} requests already waiting "
                                    f"(--max-waiting {cfg.max_waiting}); retry later")
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # Scheduling --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.token_budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_pending, budget)
            while not self.blocks.can_allocate(request.seq_id, request.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                table = self.blocks.allocate(request.seq_id, request.num_computed + n).block_table
                out.scheduled.append(ScheduledSeq(request, n, list(table)))
                budget -= n
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            n = min(request.num_pending, budget)
            if not self.blocks.can_allocate(request.seq_id, n):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            table = self.blocks.allocate(request.seq_id, n).block_table
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_s is None:
                request.first_scheduled_s = time.monotonic()
            self.running.append(request)
            out.scheduled.append(ScheduledSeq(request, n, list(table)))
            budget -= n

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.blocks.free(request.seq_id)
        request.reset_for_recompute()
        self.waiting.appendleft(request)
        out.preempted.append(request)
        self.num_preemptions += 1

    # Updates -----------------------------------------------------------------------------------
    def mark_computed(self, out: SchedulerOutput) -> None:
        for s in out.scheduled:
            s.request.num_computed += s.num_new_tokens
            s.request.is_params_sent = True

    def finish(self, request: Request, status: RequestStatus, stop_reason: str = "") -> None:
        """End a request wherever it is; its blocks are freed now."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request.seq_id)
        request.finish(status, stop_reason)
