"""Causal prefill attention: the panel kernel against torch's SDPA, side by side in one process.

    .venv/bin/python bench/prefill_attention.py [--shapes 16x4x64,32x8x128]
        [--batches 32x8,128x8,512x2,926x1,2048x1] [--threads 2] [--reps 9] [--json PATH]

Shapes are HQxHKVxD (bench-mixtral's 16 x 4 x 64 and Mixtral-8x7B's 32 x 8 x 128); batches are
LENxPROMPTS of equal-length prompts packed as the expert service packs a step's new tokens. Both
paths (`moelens.panel_gemm.causal_attention`, `moelens.model.attention.prefill_attention`) run
alternately on the same inputs, so a drift of the shared machine moves both columns alike; prints
the median ms, GFLOP/s (causal: the half of Q·K^T and P·V at or below the diagonal) and the
speedup, and checks that the outputs agree.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ab_kernels import timed  # bench/ is the script's folder: the same alternating timer
from moelens import panel_gemm
from moelens.model.attention import prefill_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="16x4x64,32x8x128")
    parser.add_argument("--batches", default="32x8,128x8,512x2,926x1,2048x1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if not panel_gemm.is_supported():
        raise SystemExit("the panel kernels need an x86-64 CPU with AVX2 + FMA")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"fp32, {args.threads} threads; median ms of {args.reps} alternating calls")
    print(f"{'HQxHKVxD':>10} {'LENxN':>8} {'sdpa ms':>9} {'GFLOP/s':>8} {'panel ms':>9} "
          f"{'GFLOP/s':>8} {'speedup':>8}")
    for shape in args.shapes.split(","):
        heads, kv_heads, dim = (int(x) for x in shape.split("x"))
        for batch in args.batches.split(","):
            length, prompts = (int(x) for x in batch.split("x"))
            lengths, tokens = [length] * prompts, length * prompts
            q = torch.randn(tokens, heads, dim, generator=gen)
            k, v = torch.randn(2, tokens, kv_heads, dim, generator=gen)
            scale = dim ** -0.5
            ours = panel_gemm.causal_attention(q, k, v, lengths, scale)
            torch.testing.assert_close(ours, prefill_attention(q, k, v, lengths, scale),
                                       atol=1e-4, rtol=1e-4)
            paths = (prefill_attention, panel_gemm.causal_attention)
            times = timed(lambda i: paths[i](q, k, v, lengths, scale), args.reps, len(paths))
            sdpa, panel = (statistics.median(t) * 1e3 for t in times)
            flops = 2 * prompts * heads * length * (length + 1) * dim  # two GEMMs, causal half
            row = {"heads": heads, "kv_heads": kv_heads, "head_dim": dim, "prompt_len": length,
                   "prompts": prompts, "sdpa_ms": sdpa, "panel_ms": panel,
                   "sdpa_gflops": flops / sdpa / 1e6, "panel_gflops": flops / panel / 1e6,
                   "speedup": sdpa / panel}
            rows.append(row)
            print(f"{shape:>10} {batch:>8} {sdpa:9.2f} {row['sdpa_gflops']:8.1f} {panel:9.2f} "
                  f"{row['panel_gflops']:8.1f} {row['speedup']:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
