"""The coordinator's engine loop: schedule -> execute -> update, on its own thread.

Requests arrive from gRPC handler threads through `add` / `abort`; the loop thread is the only
one that touches the scheduler's queues, so they need no locks beyond the inbox.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from moelens.errors import InvalidArgument, Unavailable
from moelens.stats import StepStats
from services.coordinator.executor import Executor, StepResult
from services.coordinator.request import Request, RequestStatus
from services.coordinator.scheduler import Scheduler, SchedulerOutput
from services.coordinator.stopping import StopChecker

log = logging.getLogger(__name__)


@dataclass
class _Inbox:
    """What handler threads hand to the loop."""

    lock: threading.Condition = field(default_factory=threading.Condition)
    new: list[Request] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    errors: dict[str, Exception] = field(default_factory=dict)


class Engine:
    def __init__(self, scheduler: Scheduler, executor: Executor, stop_checker: StopChecker,
                 observer=None):
        self.scheduler, self.executor, self.stop = scheduler, executor, stop_checker
        self.observer = observer  # gets StepStats and finished Requests (the metrics exporter)
        self.requests: dict[str, Request] = {}
        self._inbox = _Inbox()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.num_steps = 0
        self.fatal_error: Exception | None = None

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop; live requests end with UNAVAILABLE rather than hanging their streams."""
        self._stopping.set()
        with self._inbox.lock:
            self._inbox.lock.notify_all()
        self._thread.join(timeout=30)
        self._fail_all(Unavailable("the coordinator is shutting down"))

    # Handler-thread API ------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Admit a request (validation and queue bounds raise here, in the caller's thread)."""
        with self._inbox.lock:
            if self.fatal_error is not None:
                raise self.fatal_error
            if request.request_id in self.requests:
                raise InvalidArgument(f"request_id {request.request_id!r} is already running")
            self.scheduler.add(request)
            self.requests[request.request_id] = request
            self._inbox.lock.notify_all()

    def abort(self, request_id: str) -> bool:
        with self._inbox.lock:
            if request_id not in self.requests:
                return False
            self._inbox.aborts.append(request_id)
            self._inbox.lock.notify_all()
            return True

    def live_pairs(self) -> list[tuple[int, int]]:
        """(prompt_len, max_tokens) of every live request: the load the Lens predicts for."""
        with self._inbox.lock:
            return [(len(r.prompt_ids), r.params.max_tokens) for r in self.requests.values()]

    # Loop --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._wait_for_work():
                    continue
                self.step()
        except Exception as err:  # noqa: BLE001 - a dead compute service: fail every request
            log.exception("engine loop stopped")
            self._fail_all(err)

    def _wait_for_work(self) -> bool:
        with self._inbox.lock:
            self._apply_aborts()
            if not self.scheduler.has_work:
                self._inbox.lock.wait()
                return False
            return True

    def step(self) -> None:
        with self._inbox.lock:  # admission mutates the waiting queue from handler threads
            plan = self.scheduler.schedule()
        result = self.executor.execute(plan)
        self._update(plan, result)

    def _update(self, plan: SchedulerOutput, result: StepResult) -> None:
        with self._inbox.lock:
            self.scheduler.mark_computed(plan)
            finished = []
            for s in plan.scheduled:
                sampled = result.tokens.get(s.request.seq_id)
                if sampled is None or s.request.status.is_finished:
                    continue
                status, reason = self.stop.append(s.request, sampled)
                if status is not None:
                    self._finish(s.request, status, reason)
                    finished.append(s.request)
            self.num_steps += 1
        self.executor.release([r.seq_id for r in finished])  # outside the lock: an RPC
        if self.observer:
            self.observer.on_step(self._stats(plan, result))
            for request in finished:
                self.observer.on_finished(request)

    def _finish(self, request: Request, status: RequestStatus, reason: str = "") -> None:
        """End a request here; its sequence's blocks on the services go with `executor.release`,
        once per step for all that ended (before the next schedule reuses the block ids)."""
        self.scheduler.finish(request, status, reason)
        self.requests.pop(request.request_id, None)

    def _apply_aborts(self) -> None:
        aborted = []
        for request_id in self._inbox.aborts:
            request = self.requests.get(request_id)
            if request is not None and not request.status.is_finished:
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        self._inbox.aborts.clear()
        self.executor.release([r.seq_id for r in aborted])
        if self.observer:
            for request in aborted:
                self.observer.on_finished(request)

    def _fail_all(self, err: Exception) -> None:
        with self._inbox.lock:
            self.fatal_error = err
            for request in list(self.requests.values()):
                request.publish(err)
            self.requests.clear()

    def _stats(self, plan: SchedulerOutput, result: StepResult) -> StepStats:
        decode = sum(1 for s in plan.scheduled if s.request.output_ids and s.num_new_tokens == 1)
        return StepStats(
            step_id=result.step_id, num_prefill_tokens=plan.num_tokens - decode,
            num_decode_tokens=decode, num_seqs=len(plan.scheduled), wall_s=result.wall_s,
            timings=result.timings, num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_used_blocks=self.scheduler.blocks.num_used_blocks,
            num_total_blocks=self.scheduler.blocks.num_blocks,
            num_preempted=len(plan.preempted), token_budget=self.scheduler.config.token_budget)
