"""moelens.compute_loop: calls from other threads run on the owner thread, in order, with their
results and exceptions handed back; after stop, queued and late calls fail with UNAVAILABLE.
The OpenMP team is pinned one thread per CPU where asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from moelens.compute_loop import ComputeLoop, pin_compute_team, team_cpus
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


def test_team_cpus_place_one_thread_per_allowed_cpu_wrapping():
    assert team_cpus(2, [3, 1]) == [1, 3]
    assert team_cpus(5, [0, 2]) == [0, 2, 0, 2, 0]
    assert team_cpus(1, [7]) == [7]


def test_pin_compute_team_modes():
    allowed = sorted(os.sched_getaffinity(0))
    calls = []

    def pin(cpus):
        calls.append(cpus)
        return cpus

    assert pin_compute_team(pin, len(allowed), "off") is None
    assert pin_compute_team(pin, len(allowed) + 1, "auto") is None  # not one thread per CPU
    assert calls == []
    assert pin_compute_team(pin, len(allowed), "auto") == allowed
    assert pin_compute_team(pin, 1, "on") == allowed[:1]
    with pytest.raises(ValueError, match="--pin-threads"):
        pin_compute_team(pin, 1, "always")


_PIN_CHILD = """
import json, os, sys, threading, torch
from moelens import panel_gemm
from moelens.compute_loop import pin_compute_team
from services.attention_cpu import kernel
n = len(os.sched_getaffinity(0))
pin = {"attention": kernel.pin_openmp_team, "panel": panel_gemm.pin_openmp_team}[sys.argv[1]]
torch.set_num_threads(n)
print(pin_compute_team(pin, n, "on"))
torch.randn(256, 256) @ torch.randn(256, 256)  # torch's parallel regions reuse the team
later = threading.Thread(target=threading.Event().wait, daemon=True)
later.start()
def cpus(tid):
    with open(f"/proc/self/task/{tid}/status") as f:
        return next(l.split()[1] for l in f if l.startswith("Cpus_allowed_list"))
print(cpus(threading.get_native_id()), cpus(later.native_id))
print(json.dumps(sorted(cpus(t) for t in os.listdir("/proc/self/task"))))
"""


@pytest.mark.parametrize("extension", ["attention", "panel"])
def test_pinned_team_runs_one_thread_per_cpu_and_new_threads_follow_the_compute_thread(
        extension):
    """In a fresh process (pinning cannot be undone): thread t of the OpenMP team on the t-th
    allowed CPU, the compute thread on the first, and a thread started afterwards (gRPC's)
    inherits the compute thread's CPU."""
    allowed = sorted(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", _PIN_CHILD, extension], capture_output=True,
                         text=True, check=True, timeout=300).stdout.splitlines()
    assert out[0] == str(allowed)
    first = str(allowed[0])
    assert out[1].split() == [first, first]
    per_thread = json.loads(out[2])
    for cpu in allowed:
        assert str(cpu) in per_thread  # a team thread on every CPU


def test_services_validate_pin_threads():
    from services.attention_cpu.config import AttentionConfig
    from services.expert_gpu.config import ExpertConfig
    with pytest.raises(ValueError, match="--pin-threads"):
        AttentionConfig(pin_threads="yes")
    with pytest.raises(ValueError, match="--pin-threads"):
        ExpertConfig(attention_address="localhost:1", pin_threads="yes")
    assert ExpertConfig(attention_address="localhost:1").pin_mode == "auto"


def test_a_long_call_serves_queued_calls_through_wake_and_poll():
    """A call that waits on the owner thread (the attention service's ring session) is woken by
    `wake` when another thread queues work, runs it with `poll`, and sees `stop`."""
    loop, woken = ComputeLoop(), threading.Event()
    results = []

    def session():
        loop.wake = woken.set
        try:
            while not loop.is_stopping:
                assert woken.wait(10), "call/stop did not wake the session"
                woken.clear()
                loop.poll()
        finally:
            loop.wake = None
        return "session over"

    def other_thread():
        while loop.wake is None:
            time.sleep(0.01)
        results.append(loop.call(lambda: threading.current_thread().name))
        loop.stop()

    threading.Thread(target=other_thread).start()
    assert loop.call(session) == "session over"  # on the owner: runs at once
    assert results == [threading.current_thread().name]
    assert loop.is_stopping
