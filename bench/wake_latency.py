"""Small attention calls after a pause, with the OpenMP team pinned and not (moelens.compute_loop).

    .venv/bin/python bench/wake_latency.py [--pause-ms 2] [--calls 300] [--rounds 2]

Each call stores one K/V row per sequence and runs paged attention for 24 rows of 160 tokens
(the built-in model's shape: 8 query heads over 2 KV heads of 32), after sleeping `--pause-ms`
as a service does between its turns; the team's workers sleep in between. Pinning cannot be
undone in a process, so each setting runs in its own child, alternating for `--rounds`. Prints
the median, p90 and p99 microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, os, sys, time, torch
from moelens.compute_loop import pin_compute_team
from moelens.kv_cache import pool_shapes
from services.attention_cpu import kernel
mode, pause, calls = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
threads = len(os.sched_getaffinity(0))
kernel.set_num_threads(threads)
pin_compute_team(kernel.pin_openmp_team, threads, mode)
rows, ctx, block = 24, 160, 16
blocks = rows * ctx // block
k_shape, v_shape = pool_shapes(blocks, 2, block, 32)
k_pool, v_pool = torch.randn(k_shape), torch.randn(v_shape)
q, new_kv = torch.randn(rows, 8, 32), torch.randn(rows, 2, 32)
tables = torch.randperm(blocks).view(rows, -1).int()
lens = torch.full((rows,), ctx, dtype=torch.int32)
slots = torch.arange(rows) * ctx
times = []
for _ in range(calls):
    time.sleep(pause)
    start = time.perf_counter()
    kernel.store_kv(k_pool, v_pool, new_kv, new_kv, slots)
    kernel.paged_attention(q, k_pool, v_pool, tables, lens, 32 ** -0.5)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pause-ms", type=float, default=2.0)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env = dict(os.environ, GOMP_SPINCOUNT=os.environ.get("GOMP_SPINCOUNT", "30000"))
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.pause_ms / 1e3),
                                  str(args.calls)], capture_output=True, text=True, check=True,
                                 env=env).stdout
            times = sorted(json.loads(out))
            at = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e6  # noqa: E731
            print(f"pinned {mode:>3}: median {at(0.5):7.1f} us, p90 {at(0.9):7.1f} us, "
                  f"p99 {at(0.99):7.1f} us ({len(times)} calls, {args.pause_ms} ms pauses)")


if __name__ == "__main__":
    main()
