"""Message rings in shared memory with a futex doorbell: the shm transport's per-layer messages.

Why: each layer's exchange is a round trip between the expert and attention services. Over the
gRPC stream it passes the client's request thread, loopback TCP, the server's handler thread and
its compute thread, and back: 0.7-0.9 ms at warmup and 1-2 ms inside a job on the 2-vCPU
development VM, where every wake-up of a halted virtual CPU is slow. Through a ring the compute
thread of one service writes the message and wakes the compute thread of the other directly (a
round trip between two processes on one CPU: 19 us there, `bench/ring_latency.py`). The gRPC stream stays open
beside it as the session: its end or failure is how either side learns the other is gone.

One ring carries one direction and lives in one slot of a ShmArena (moelens.shm):

    [0:4)    doorbell  u32  bumped by every post and every kick; waiters sleep on it (FUTEX_WAIT)
    [4:8)    written   u32  messages posted so far (the one writer's counter)
    [8:12)   taken     u32  messages taken so far (the one reader's counter)
    [64 + i * stride ...)   message i % depth: u32 length, then the payload

The writer copies the payload, then bumps `written`, then the doorbell, then wakes the reader; the
reader takes message `taken % depth` while taken < written. At most `depth` messages are in
flight (the exchange has one per pipeline group). Kicks also come from other threads of the
reader's own process; a bump lost to a race with the writer's still leaves the word different
from what the waiter read, and a waiter re-checks everything it waits for, so none is missed. That ordering needs stores to be seen in
program order (x86-64's memory model) and the futex system call; `is_supported()` says whether
this host has both, and elsewhere the messages stay on the gRPC stream.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from typing import Callable

import numpy as np

from moelens.shm import ALIGNMENT, ShmArena, align_up

_SYS_FUTEX = {"x86_64": 202}
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_DOORBELL, _WRITTEN, _TAKEN = 0, 1, 2  # u32 words of the header
_LENGTH_BYTES = 4
WAIT_S = 1.0
"""Longest futex sleep before a waiter re-checks its conditions (every event also kicks it)."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def is_supported() -> bool:
    """Linux on x86-64: the futex system call and ordered stores."""
    return sys.platform == "linux" and platform.machine() in _SYS_FUTEX


def ring_slot_bytes(message_bytes: int, depth: int) -> int:
    """Arena slot size for a ring of `depth` messages of up to `message_bytes` each."""
    return ALIGNMENT + depth * align_up(_LENGTH_BYTES + message_bytes)


class ShmRing:
    """One direction of the exchange: `post` on one side, `wait` on the other."""

    def __init__(self, arena: ShmArena, slot: int, depth: int):
        if not is_supported():
            raise ValueError(f"shared-memory rings need Linux on {sorted(_SYS_FUTEX)}")
        self._bytes = arena.slot_array(slot)  # [slot_bytes] uint8, the mapping itself
        self._header = self._bytes[:ALIGNMENT].view(np.uint32)
        self._stride = (arena.slot_bytes - ALIGNMENT) // depth // ALIGNMENT * ALIGNMENT
        if self._stride <= _LENGTH_BYTES:
            raise ValueError(f"arena slots of {arena.slot_bytes} bytes hold no ring of {depth}")
        self.depth = depth
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._futex = self._libc.syscall
        self._doorbell = ctypes.c_void_p(self._bytes.ctypes.data)
        self._nr = _SYS_FUTEX[platform.machine()]

    @property
    def capacity(self) -> int:
        """Largest payload one message may carry, bytes."""
        return self._stride - _LENGTH_BYTES

    def post(self, payload: bytes) -> None:
        """Append a message and wake the reader. Raises ValueError when it does not fit or
        `depth` messages are already waiting (a protocol error of the caller)."""
        if len(payload) > self.capacity:
            raise ValueError(f"a {len(payload)}-byte message exceeds the ring's "
                             f"{self.capacity}-byte messages")
        written = int(self._header[_WRITTEN])
        if written - int(self._header[_TAKEN]) >= self.depth:
            raise ValueError(f"the ring already holds {self.depth} unread messages")
        start = ALIGNMENT + (written % self.depth) * self._stride
        self._bytes[start:start + _LENGTH_BYTES].view(np.uint32)[0] = len(payload)
        body = start + _LENGTH_BYTES
        self._bytes[body:body + len(payload)] = np.frombuffer(payload, np.uint8)
        self._header[_WRITTEN] = (written + 1) & 0xFFFFFFFF
        self.kick()

    def reset(self) -> None:
        """Forget every message, read or not (between sessions, while neither side uses it)."""
        self._header[_WRITTEN] = 0
        self._header[_TAKEN] = 0

    def take(self) -> bytes | None:
        """The next message, or None when none is waiting."""
        taken = int(self._header[_TAKEN])
        if taken == int(self._header[_WRITTEN]):
            return None
        start = ALIGNMENT + (taken % self.depth) * self._stride
        length = int(self._bytes[start:start + _LENGTH_BYTES].view(np.uint32)[0])
        if length > self.capacity:
            raise ValueError(f"ring message of {length} bytes past the capacity {self.capacity}")
        body = start + _LENGTH_BYTES
        payload = self._bytes[body:body + length].tobytes()
        self._header[_TAKEN] = (taken + 1) & 0xFFFFFFFF
        return payload

    def wait(self, is_interrupted: Callable[[], bool]) -> bytes | None:
        """The next message, sleeping until one arrives; None as soon as `is_interrupted()` is
        true (whoever makes it true must `kick` this ring)."""
        while True:
            bell = int(self._header[_DOORBELL])
            payload = self.take()
            if payload is not None:
                return payload
            if is_interrupted():
                return None
            self._sleep_while(bell)

    def kick(self) -> None:
        """Wake the waiter (after a post, or to make it check `is_interrupted`)."""
        self._header[_DOORBELL] = (int(self._header[_DOORBELL]) + 1) & 0xFFFFFFFF
        self._futex(self._nr, self._doorbell, _FUTEX_WAKE, 2 ** 31 - 1, None, None, 0)

    def _sleep_while(self, bell: int) -> None:
        """FUTEX_WAIT on the doorbell while it still reads `bell` (at most WAIT_S): returns at
        once when a post or kick came in between. ctypes releases the GIL meanwhile."""
        timeout = _Timespec(int(WAIT_S), int(WAIT_S % 1 * 1e9))
        self._futex(self._nr, self._doorbell, _FUTEX_WAIT, ctypes.c_uint32(bell),
                    ctypes.byref(timeout), None, 0)
