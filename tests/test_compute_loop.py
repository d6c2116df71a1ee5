"""moelens.compute_loop: calls from other threads run on the owner thread, in order, with their
results and exceptions handed back; after stop, queued and late calls fail with UNAVAILABLE."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from moelens.compute_loop import ComputeLoop
from moelens.errors import Unavailable


def _serve(loop: ComputeLoop, calls) -> list:
    """Run `calls` (callables taking the loop) on 4 threads while this thread serves the loop."""
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(c, loop) for c in calls]
        threading.Thread(target=lambda: [f.exception() for f in futures] and loop.stop()).start()
        loop.run()
        return [f.exception() or f.result() for f in futures]


def test_calls_run_on_the_owner_thread_with_results_and_errors():
    loop, owner = ComputeLoop(), threading.current_thread()

    def where(_loop):
        return _loop.call(lambda: threading.current_thread() is owner)

    def fails(_loop):
        return _loop.call(lambda: 1 / 0)

    results = _serve(loop, [where] * 6 + [fails])
    assert results[:6] == [True] * 6
    assert isinstance(results[6], ZeroDivisionError)
    assert loop.call(lambda: 7) == 7  # on the owner itself: at once, even after stop


def test_calls_before_stop_run_and_later_ones_fail():
    loop = ComputeLoop()
    with ThreadPoolExecutor(2) as pool:
        before = pool.submit(loop.call, lambda: "served")
        while loop._queue.qsize() < 1:
            pass
        loop.stop()
        after = pool.submit(loop.call, lambda: "never")  # queued behind the stop
        while loop._queue.qsize() < 3:
            pass
        loop.run()
        assert before.result(5) == "served"
        with pytest.raises(Unavailable, match="shutting down"):
            after.result(5)
        with pytest.raises(Unavailable, match="shutting down"):  # and once stopped, at once
            pool.submit(loop.call, lambda: 1).result(5)
