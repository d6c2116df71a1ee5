"""Time the fused CPU RMSNorm (panel_gemm.rms_norm, csrc/rms_norm.cpp) against the torch ops it
replaces (moelens.model.stages.rms_norm_torch) on a layer's [rows, hidden] input.

    .venv/bin/python bench/rms_norm.py [--rows 256,1024,2048] [--hidden 1024] [--threads 2]
        [--dtypes bfloat16,float32] [--repeats 30]

Both are called alternately in one process, so the machine's drift moves both columns alike;
the best call of each is printed, in ms. Run through this script the process keeps freed memory
as `moe-lens` does (moelens/malloc_tuning.py), so torch's temporaries do not page-fault.
"""

from __future__ import annotations

import argparse
import time

import torch

from moelens import panel_gemm
from moelens.malloc_tuning import keep_freed_memory
from moelens.model.stages import rms_norm_torch


def best_ms(fns, repeats: int) -> list[float]:
    """Best wall time of each function over `repeats` alternated rounds, after one warm-up."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="256,1024,2048")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    if not panel_gemm.is_supported():
        raise SystemExit("no panel kernels on this CPU: nothing to compare")
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, args.hidden).to(dtype)
            w = torch.rand(args.hidden).to(dtype) + 0.5
            torch_ms, fused_ms = best_ms([lambda: rms_norm_torch(x, w, 1e-5),
                                          lambda: panel_gemm.rms_norm(x, w, 1e-5)],
                                         args.repeats)
            print(f"{str(dtype)[6:]:8s} [{rows}, {args.hidden}]: torch ops {torch_ms:.3f} ms, "
                  f"fused {fused_ms:.3f} ms ({torch_ms / fused_ms:.1f}x)")


if __name__ == "__main__":
    main()
