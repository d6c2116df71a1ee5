"""Round trip of a message through the exchange's shared-memory rings, between two processes.

    .venv/bin/python bench/ring_latency.py [--bytes 200] [--messages 2000]

A child process echoes every message from one ring onto the other (moelens.shm_ring, as the
attention service answers the expert's LayerRequests); prints the median, p90 and p99 round trip
in microseconds. Compare with the `exchange_fixed_s` the expert service measures at warmup over
the same path plus both services' Python (`moe-lens profile ... --expert --attention`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from moelens.shm import ShmArena
from moelens.shm_ring import ShmRing, ring_slot_bytes

ECHO = """
import sys
from moelens.shm import ShmArena
from moelens.shm_ring import ShmRing
arena = ShmArena.attach(sys.argv[1], 2, int(sys.argv[2]))
inbox, outbox = ShmRing(arena, 0, 2), ShmRing(arena, 1, 2)
while (message := inbox.wait(lambda: False)) != b"stop":
    outbox.post(message)
arena.close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=200)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    with ShmArena.create(2, ring_slot_bytes(max(args.bytes, 8), 2)) as arena:
        child = subprocess.Popen([sys.executable, "-c", ECHO, arena.name, str(arena.slot_bytes)])
        outbox, inbox = ShmRing(arena, 0, 2), ShmRing(arena, 1, 2)
        payload, times = b"x" * args.bytes, []
        for _ in range(args.messages):
            start = time.perf_counter()
            outbox.post(payload)
            inbox.wait(lambda: False)
            times.append(time.perf_counter() - start)
        outbox.post(b"stop")
        child.wait(timeout=30)
    times.sort()
    at = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e6  # noqa: E731
    print(f"{args.bytes}-byte message and back: median {at(0.5):.1f} us, p90 {at(0.9):.1f} us, "
          f"p99 {at(0.99):.1f} us ({args.messages} round trips)")


if __name__ == "__main__":
    main()
