"""The panel GEMM against torch's F.linear (MKL) on plain [M, K] x [K, N] products, in one process.

    .venv/bin/python bench/panel_vs_mkl.py [--isa avx512|avx2] [--threads 2] [--reps 6]
        [--shapes 64x4096x1024,256x4096x1024,768x4096x1024,3072x1536x1024,768x1024x2048]

For each MxNxK the two are called alternately over 4 weight copies (so neither keeps its weight
in L2), and the median and best GFLOP/s of each and the ratio of the medians are printed. The
fused MoE layer has its own benchmark (`moe-lens bench experts`); this one isolates the kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moelens import panel_gemm

COPIES = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", choices=["avx512", "avx2"], default=None,
                        help="panel micro-kernel (default: the best this CPU runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--shapes",
                        default="64x4096x1024,256x4096x1024,768x4096x1024,3072x1536x1024,"
                                "768x1024x2048")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"panel kernel {panel_gemm.set_isa(args.isa)}, {args.threads} threads; GFLOP/s")
    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.split("x"))
        weights = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(COPIES)]
        panels = [panel_gemm.pack(w) for w in weights]
        x = torch.randn(m, k, generator=gen)  # [M, K]
        seconds = {"panels": [], "mkl": []}
        for _ in range(args.reps):
            for i in range(COPIES):
                for name, fn in (("panels", lambda: panel_gemm.linear(x, panels[i])),
                                 ("mkl", lambda: F.linear(x, weights[i]))):
                    start = time.perf_counter()
                    fn()
                    seconds[name].append(time.perf_counter() - start)
        flops = 2.0 * m * n * k
        med = {name: statistics.median(t) for name, t in seconds.items()}
        print(f"{m:5d} x {n:5d} x {k:5d}: panels {flops / med['panels'] / 1e9:6.1f} "
              f"(best {flops / min(seconds['panels']) / 1e9:6.1f})  mkl "
              f"{flops / med['mkl'] / 1e9:6.1f} (best {flops / min(seconds['mkl']) / 1e9:6.1f})  "
              f"panels / mkl {med['mkl'] / med['panels']:.2f}")


if __name__ == "__main__":
    main()
