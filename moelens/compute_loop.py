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
one team and 1000-30000 spins.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from moelens.errors import Unavailable

OPENMP_SPIN_COUNT = "30000"


def default_openmp_spin() -> None:
    """GOMP_SPINCOUNT = OPENMP_SPIN_COUNT unless set. libgomp reads it when it loads: call this
    before torch is imported (the `moe-lens` entry point does)."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


class ComputeLoop:
    """Runs callables, one at a time, on the thread that created it (`run` serves them there)."""

    def __init__(self) -> None:
        self._owner = threading.current_thread()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Lock()  # orders a late call against the final drain
        self._stopped = False

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
        return future.result()

    def run(self) -> None:
        """Serve calls on the owner thread, in order, until `stop`'s turn comes; calls queued
        after it fail with UNAVAILABLE, none is dropped silently."""
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 (handed to the caller)
                future.set_exception(exc)
        with self._closing:
            self._stopped = True
            while not self._queue.empty():
                if (item := self._queue.get_nowait()) is not None:
                    item[0].set_exception(Unavailable("the service is shutting down"))

    def stop(self) -> None:
        """Make `run` return once the calls already queued have run (safe from a signal
        handler)."""
        self._queue.put(None)
