"""What bf16 dot products would cost decode attention in accuracy (the case for and against a
VDPBF16PS path for bf16 KV, issue 4).

    .venv/bin/python bench/attention_dot_precision.py [--trials 20]

AVX512-BF16's VDPBF16PS multiplies pairs of bf16 into fp32 sums at twice the rate of fp32 FMAs.
With bf16 K and V in the pool, using it for the scores needs q in bf16 and for the output the
probabilities in bf16; each can instead be split into a bf16 high and low part (two dot products,
fp32-exact against bf16 KV, and no faster than FMAs). For random q, K, V (K and V already bf16, 8
query heads on one KV head, head dims 36-128, contexts 1-5000) this prints the largest absolute
error of each choice against exact softmax attention on the same bf16 K and V: what the kernel
tests compare with (`tests/test_attention_kernel.py`, 2e-3 for 16-bit KV).
"""

from __future__ import annotations

import argparse

import torch


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def _hi_lo(x: torch.Tensor) -> torch.Tensor:
    """x as the sum of two bf16 values: what two dot products on bf16 halves compute."""
    hi = _bf16(x)
    return hi + _bf16(x - hi)


CHOICES = {"q bf16, p bf16 (one dot each)": (_bf16, _bf16),
           "q hi+lo, p bf16": (_hi_lo, _bf16),
           "q bf16, p fp32": (_bf16, lambda x: x),
           "q hi+lo, p hi+lo (FMA-rate)": (_hi_lo, _hi_lo)}


def worst_errors(trials: int, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    worst = dict.fromkeys(CHOICES, 0.0)
    for head_dim in (36, 64, 80, 128):
        for context in (1, 2, 3, 5, 7, 16, 17, 53, 300, 700, 5000):
            for _ in range(trials):
                q = torch.randn(8, head_dim) * head_dim ** -0.5  # [Hq, D], scale folded in
                k, v = _bf16(torch.randn(context, head_dim)), _bf16(torch.randn(context, head_dim))
                exact = torch.softmax(q @ k.T, -1) @ v  # [Hq, D]
                for name, (round_q, round_p) in CHOICES.items():
                    s = round_q(q) @ k.T  # [Hq, L]
                    p = torch.exp(s - s.max(-1, keepdim=True).values)
                    out = round_p(p) @ v / p.sum(-1, keepdim=True)
                    worst[name] = max(worst[name], (out - exact).abs().max().item())
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="random cases per shape")
    args = parser.parse_args()
    for name, error in worst_errors(args.trials).items():
        print(f"{name:32s} worst |error| {error:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
