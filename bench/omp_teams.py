"""What a second OpenMP team costs: a small bf16 panel GEMM issued from the main thread only,
and from a second thread after the main thread has opened parallel regions (libgomp then holds
more workers than CPUs and its waiting threads sleep almost at once; moelens/compute_loop.py).

    .venv/bin/python bench/omp_teams.py [--calls 3000] [--threads 2]

Each case runs in its own process (a team, once made, lasts as long as its thread); prints the
mean µs per call of each and their ratio. fp32 panels where the CPU has no bf16 engine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time


def _time_calls(calls: int, threads: int, second_thread: bool) -> float:
    import torch

    from moelens import panel_gemm
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if panel_gemm.is_supported(torch.bfloat16) else torch.float32
    x = torch.randn(32, 1024).to(dtype)
    w = panel_gemm.pack((torch.randn(512, 1024) * 0.03).to(dtype))

    def per_call_us() -> float:
        panel_gemm.linear(x, w)
        start = time.perf_counter()
        for _ in range(calls):
            panel_gemm.linear(x, w)
        return (time.perf_counter() - start) / calls * 1e6

    main_us = min(per_call_us() for _ in range(3))
    if not second_thread:
        return main_us
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.append(min(per_call_us() for _ in range(3))))
    worker.start()
    worker.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", choices=("main", "second"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(_time_calls(args.calls, args.threads, args.case == "second"))
        return
    us = {}
    for case in ("main", "second"):
        run = subprocess.run([sys.executable, __file__, "--case", case, "--calls", str(args.calls),
                              "--threads", str(args.threads)], check=True, capture_output=True,
                             text=True)
        us[case] = float(run.stdout.split()[-1])
    print(f"32 x 1024 x 512 GEMM, {args.threads} threads: main thread only {us['main']:.1f} µs, "
          f"second thread {us['second']:.1f} µs ({us['second'] / us['main']:.2f}x)")


if __name__ == "__main__":
    main()
