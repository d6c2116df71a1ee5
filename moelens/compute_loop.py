"""A service's compute runs on one thread, its main thread: gRPC handlers hand it their work.

Why: libgomp (torch's and our kernels' OpenMP) gives every thread that opens a parallel region
its own team of worker threads. Once a process holds more of them than it has CPUs, a waiting
worker spins only ~100 times before it sleeps, so every parallel region pays a futex wake-up.
On the 2-vCPU development VM a small GEMM issued from a second thread took 174 µs instead of 90
(`bench/omp_teams.py`), and in a bench job ~12% of both cores sat idle between regions. With
model loading, warmup and every step on the main thread, the process keeps one team.

With one team libgomp's own default spin (GOMP_SPINCOUNT 300000, milliseconds) applies instead,
and then the waiting threads of one service spin through the other's turn on the cores they
share (the expert and attention services alternate every layer): `OPENMP_SPIN_COUNT` bridges
the gaps between one service's parallel regions and no more. bench-mixtral bf16 job, 2 vCPUs
(2026-12-06): 366-370 out tok/s before, 348 with one team and the default spin, 386-398 with
one team and 1000-30000 spins. A spin is one `pause` (26 ns on that Zen 4: 30000 spins are
0.78 ms); with the teams pinned (below) the two services' workers share a CPU, and a worker
still spinning from its own turn slowed the other service's next layer: a 1-token layer's
GEMMs took 0.88 ms in a job against 0.27 alone. At 3000 (78 us) the built-in model's
decode job ran at 2124-2308 total tok/s against 1876-1955 at 30000 (100: 1464; 2026-12-07),
and bench-mixtral's job was unchanged (358/400 vs 376/376 out tok/s, alternated).

Where a service's team spans every CPU it may use (the services share the host's cores and
take turns on them), `pin_compute_team` pins thread t of the team to the t-th CPU, the compute
thread included, before the service starts any other thread: gRPC's threads then inherit the
compute thread's CPU, so a turn's hand-offs (stream message, queue, compute thread) stay on one
CPU, and each worker wakes where it slept. Unpinned, on the 2-vCPU development VM, more than
10% of small attention calls after a 2 ms pause took 2.5-2.9 ms instead of ~0.2 (p90 2.50-2.75
ms unpinned, 0.22 pinned: `bench/wake_latency.py`).
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from moelens.errors import Unavailable

OPENMP_SPIN_COUNT = "3000"
PIN_MODES = ("auto", "on", "off")
"""--pin-threads: auto pins when the team spans every CPU the process may use."""


def default_openmp_spin() -> None:
    """GOMP_SPINCOUNT = OPENMP_SPIN_COUNT unless set. libgomp reads it when it loads: call this
    before torch is imported (the `moe-lens` entry point does)."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


def check_pin_mode(mode: str) -> None:
    """ValueError naming the flag unless `mode` is one of PIN_MODES."""
    if mode not in PIN_MODES:
        raise ValueError(f"--pin-threads must be one of {PIN_MODES}, got {mode!r}")


def team_cpus(num_threads: int, allowed: list[int]) -> list[int]:
    """The CPU of each thread of a team: thread t on the t-th allowed CPU, wrapping around."""
    cpus = sorted(allowed)
    return [cpus[t % len(cpus)] for t in range(num_threads)]


def pin_compute_team(pin: Callable[[list[int]], list[int] | None], num_threads: int,
                     mode: str) -> list[int] | None:
    """Pin this thread's OpenMP team of `num_threads` with `pin` (an extension's
    pin_openmp_team) when `mode` is "on", or "auto" and the team spans every CPU this process
    may use. Call it on the compute thread before the service starts other threads. Returns the
    CPUs pinned to, or None when it did not pin."""
    check_pin_mode(mode)
    allowed = sorted(os.sched_getaffinity(0))
    if mode == "off" or (mode == "auto" and num_threads != len(allowed)):
        return None
    return pin(team_cpus(num_threads, allowed))


class ComputeLoop:
    """Runs callables, one at a time, on the thread that created it (`run` serves them there).

    A call may itself wait for long on the owner thread (the attention service's exchange
    session waits on its shared-memory ring there): it sets a `wake` hook that `call` and `stop`
    invoke after queueing, and runs what was queued meanwhile with `poll`."""

    def __init__(self) -> None:
        self._owner = threading.current_thread()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Lock()  # orders a late call against the final drain
        self._stopped = False
        self.is_stopping = False
        """True once `stop`'s turn has come (a long call should then return)."""
        self.wake: Callable[[], None] | None = None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the owner thread; its result or its exception here. On the owner thread
        itself (startup, warmup) it runs at once."""
        if threading.current_thread() is self._owner:
            return fn(*args)
        future: Future = Future()
        with self._closing:
            if self._stopped:
                raise Unavailable("the service is shutting down")
            self._queue.put((future, fn, args))
        self._wake()
        return future.result()

    @property
    def has_queued(self) -> bool:
        return not self._queue.empty()

    def run(self) -> None:
        """Serve calls on the owner thread, in order, until `stop`'s turn comes; calls queued
        after it fail with UNAVAILABLE, none is dropped silently."""
        while not self.is_stopping:
            self._serve(self._queue.get())
        with self._closing:
            self._stopped = True
            while not self._queue.empty():
                if (item := self._queue.get_nowait()) is not None:
                    item[0].set_exception(Unavailable("the service is shutting down"))

    def poll(self) -> None:
        """Run the calls queued so far, from within a call on the owner thread (up to `stop`'s
        turn, which sets is_stopping)."""
        while not self.is_stopping and not self._queue.empty():
            self._serve(self._queue.get_nowait())

    def stop(self) -> None:
        """Make `run` return once the calls already queued have run (safe from a signal
        handler)."""
        self._queue.put(None)
        self._wake()

    def _serve(self, item) -> None:
        if item is None:
            self.is_stopping = True
            return
        future, fn, args = item
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            future.set_exception(exc)

    def _wake(self) -> None:
        wake = self.wake
        if wake is not None:
            wake()
