"""moelens.shm_ring: messages between two processes through a shared-memory ring, in order and
intact; the ring's limits fail loudly; a waiter wakes for a message or a kick."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from moelens import shm_ring
from moelens.shm import ShmArena
from moelens.shm_ring import ShmRing, ring_slot_bytes

pytestmark = pytest.mark.skipif(not shm_ring.is_supported(), reason="rings need Linux x86-64")

DEPTH = 2

_ECHO = """
import sys
from moelens.shm import ShmArena
from moelens.shm_ring import ShmRing
arena = ShmArena.attach(sys.argv[1], 2, int(sys.argv[2]))
inbox, outbox = ShmRing(arena, 0, 2), ShmRing(arena, 1, 2)
while (message := inbox.wait(lambda: False)) != b"stop":
    outbox.post(message[::-1])
arena.close()
"""


@pytest.fixture
def arena():
    with ShmArena.create(2, ring_slot_bytes(4096, DEPTH)) as a:
        yield a


def test_messages_cross_processes_in_order_and_intact(arena):
    """Another process echoes each message reversed; two in flight at a time, as the pipeline's
    two groups do, with sizes from empty to the ring's capacity."""
    child = subprocess.Popen([sys.executable, "-c", _ECHO, arena.name, str(arena.slot_bytes)])
    outbox, inbox = ShmRing(arena, 0, DEPTH), ShmRing(arena, 1, DEPTH)
    sizes = [0, 1, 63, 64, 65, 1000, outbox.capacity] * 20
    messages = [bytes((i * 7 + j) % 256 for j in range(n)) for i, n in enumerate(sizes)]
    try:
        outbox.post(messages[0])
        for i, message in enumerate(messages):
            if i + 1 < len(messages):
                outbox.post(messages[i + 1])  # the next before this one's answer
            assert inbox.wait(lambda: False) == message[::-1]
        outbox.post(b"stop")
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()


def test_limits_fail_loudly_and_reset_forgets(arena):
    ring = ShmRing(arena, 0, DEPTH)
    with pytest.raises(ValueError, match="exceeds"):
        ring.post(b"x" * (ring.capacity + 1))
    ring.post(b"a")
    ring.post(b"b")
    with pytest.raises(ValueError, match="unread"):
        ring.post(b"c")
    assert ring.take() == b"a"
    ring.reset()
    assert ring.take() is None
    ring.post(b"d")
    assert ring.take() == b"d"
    with pytest.raises(ValueError, match="hold no ring"):
        ShmRing(arena, 0, depth=arena.slot_bytes)


def test_wait_returns_none_once_interrupted_and_kicked(arena):
    ring, stop = ShmRing(arena, 1, DEPTH), threading.Event()
    threading.Timer(0.2, lambda: (stop.set(), ring.kick())).start()
    start = time.monotonic()
    assert ring.wait(stop.is_set) is None
    assert time.monotonic() - start < shm_ring.WAIT_S  # woken by the kick, not the timeout
