"""Time one bench-mixtral-shaped MoE layer on the bf16 panel kernel (panel_gemm.grouped_swiglu).

    .venv/bin/python bench/moe_layer_bf16.py [--tokens 2800] [--threads 2] [--repeats 30]
        [--engine amx|avx512_bf16]

E 8 experts, H 1024, I 2048, top-2: 2T (token, expert) pairs split evenly over the experts, random
bf16 weights packed as the expert service packs them. Prints the best call's ms and GFLOP/s, and
beside it torch's (oneDNN's) bf16 GEMM of 2048 x 2048 x 2048 timed just before, the machine's
bf16 peak as the roofline measures it. To compare two builds, run it alternately on each (e.g.
with `git stash`); the machine drifts.
"""

from __future__ import annotations

import argparse

import torch

from moelens import panel_gemm
from moelens_cli.bench_common import best_rate

E, H, I = 8, 1024, 2048  # noqa: E741 (I: the expert intermediate size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2800)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--engine", default=None, help="pin a bf16 engine (default: the best)")
    args = parser.parse_args()
    if not panel_gemm.is_supported(torch.bfloat16):
        raise SystemExit("this CPU has no AMX-BF16 or AVX512-BF16 (or the extension did not build)")
    engine = panel_gemm.set_bf16_engine(args.engine)
    torch.set_num_threads(args.threads)
    peak = _torch_gemm_gflops(args.repeats)
    torch.manual_seed(0)
    gate_up = panel_gemm.pack(torch.randn(E, 2 * I, H).bfloat16() * 0.05, gated=True)
    down = panel_gemm.pack(torch.randn(E, H, I).bfloat16() * 0.05)
    x = torch.randn(args.tokens, H).bfloat16()  # [T, H]
    pairs = 2 * args.tokens
    token = torch.randint(0, args.tokens, (pairs,))
    weight = torch.rand(pairs)
    counts = torch.full((E,), pairs // E)
    flops = 2.0 * (pairs // E) * E * H * 3 * I
    gflops = best_rate(lambda: panel_gemm.grouped_swiglu(x, token, weight, counts, gate_up, down),
                       flops, args.repeats) / 1e9
    ms = flops / gflops / 1e6
    print(f"MoE layer, {args.tokens} tokens, {args.threads} threads, {engine}: {ms:.2f} ms, "
          f"{gflops:.0f} GFLOP/s = {gflops / peak:.2f} x torch's bf16 GEMM ({peak:.0f} GFLOP/s)")


def _torch_gemm_gflops(repeats: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    return best_rate(lambda: torch.mm(a, b), 2.0 * n ** 3, max(3, repeats // 3)) / 1e9


if __name__ == "__main__":
    main()
