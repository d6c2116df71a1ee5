"""`moe-lens bench experts`: grouped per-expert GEMMs against a per-token gather, on the CPU.

`grouped_experts` sorts the T·K (token, expert) pairs by expert and runs one [rows_e, H] GEMM
per expert; `gather_experts_per_token` copies each pair's expert weights and runs a batch of
[1, H] products (the per-token path). Both get the same inputs and routing; the table gives
milliseconds per MoE layer, the speedup and the largest difference between their outputs.
The grouped path runs twice: with torch's F.linear (MKL) and, where the CPU has AVX2+FMA, with
the weights packed for moelens.panel_gemm (what the expert service runs on such CPUs).

The gather path copies 3·H·I weights per pair, so it runs in chunks of tokens whose copies fit
--max-gather-gb, and is skipped above --max-gather-tokens (it would take minutes).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from moelens import panel_gemm
from moelens.model.moe import Routing, gather_experts_per_token, grouped_experts, route
from moelens_cli.bench_common import write_json


@dataclass(frozen=True)
class ExpertShape:
    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int


SHAPES = {s.name: s for s in (
    ExpertShape("bench-mixtral", 1024, 2048, 8, 2),
    ExpertShape("small", 256, 768, 8, 2),
)}
DEFAULT_TOKENS = "16,64,256,1024,4096"


@dataclass
class ExpertRow:
    shape: str
    tokens: int
    grouped_ms: float
    gather_ms: float | None
    """None where the gather path was skipped (too many tokens)."""
    speedup: float | None
    max_abs_diff: float | None
    """Largest difference of the gather and panel outputs from the grouped torch output."""
    grouped_gflops: float
    panels_ms: float | None = None
    """grouped_experts with panel-packed weights; None where the panel GEMM cannot run."""
    panels_gflops: float | None = None
    panels_speedup: float | None = None
    """grouped_ms / panels_ms."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma list of token counts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (minimum is kept)")
    parser.add_argument("--max-gather-tokens", type=int, default=256,
                        help="skip the gather path above this many tokens")
    parser.add_argument("--max-gather-gb", type=float, default=1.0,
                        help="weight copies the gather path may hold at once, GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")


def _best_ms(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3, out


def _chunked_gather(x: torch.Tensor, routing: Routing, gate_up: torch.Tensor,
                    down: torch.Tensor, chunk: int) -> torch.Tensor:
    parts = [gather_experts_per_token(x[i:i + chunk], Routing(routing.weights[i:i + chunk],
                                                              routing.experts[i:i + chunk]),
                                      gate_up, down)
             for i in range(0, x.shape[0], chunk)]
    return torch.cat(parts)  # [T, H]


def bench_shape(shape: ExpertShape, token_counts: list[int], args: argparse.Namespace,
                ) -> list[ExpertRow]:
    gen = torch.Generator().manual_seed(args.seed)
    h, i, e = shape.hidden, shape.intermediate, shape.num_experts
    gate_up = torch.randn(e, 2 * i, h, generator=gen) * h ** -0.5  # [E, 2I, H]
    down = torch.randn(e, h, i, generator=gen) * i ** -0.5  # [E, H, I]
    router = torch.randn(e, h, generator=gen) * h ** -0.5  # [E, H]
    packed = ((panel_gemm.pack(gate_up, gated=True), panel_gemm.pack(down))
              if panel_gemm.is_supported() else None)
    pair_bytes = 3 * h * i * 4
    chunk = max(1, int(args.max_gather_gb * 2 ** 30 // (pair_bytes * shape.top_k)))
    rows = []
    for t in token_counts:
        x = torch.randn(t, h, generator=gen)  # [T, H]
        routing = route(x, router, shape.top_k, renormalize=True)
        grouped_ms, grouped = _best_ms(lambda: grouped_experts(x, routing, gate_up, down),
                                       args.repeats)
        flops = 2.0 * t * shape.top_k * 3 * h * i
        row = ExpertRow(shape.name, t, grouped_ms, None, None, None, flops / (grouped_ms * 1e6))
        if packed is not None:
            row.panels_ms, paneled = _best_ms(lambda: grouped_experts(x, routing, *packed),
                                              args.repeats)
            row.panels_gflops = flops / (row.panels_ms * 1e6)
            row.panels_speedup = grouped_ms / row.panels_ms
            row.max_abs_diff = float((paneled - grouped).abs().max())
        if t <= args.max_gather_tokens:
            # one timed run when a run takes seconds: the comparison is not close
            repeats = 1 if t * shape.top_k * pair_bytes > 4 * 2 ** 30 else args.repeats
            row.gather_ms, gathered = _best_ms(
                lambda: _chunked_gather(x, routing, gate_up, down, chunk), repeats)
            row.speedup = row.gather_ms / grouped_ms
            row.max_abs_diff = max(row.max_abs_diff or 0.0,
                                   float((gathered - grouped).abs().max()))
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_header() -> str:
    return (f"{'shape':<14} {'tokens':>6} {'grouped ms':>11} {'GFLOP/s':>8} {'gather ms':>11} "
            f"{'speedup':>8} {'max|diff|':>10} {'panels ms':>10} {'GFLOP/s':>8} {'vs torch':>9}")


def format_row(row: ExpertRow) -> str:
    def opt(value: float | None, spec: str) -> str:
        return "skipped" if value is None else format(value, spec)

    return (f"{row.shape:<14} {row.tokens:>6} {row.grouped_ms:>11.2f} {row.grouped_gflops:>8.1f} "
            f"{opt(row.gather_ms, '.2f'):>11} {opt(row.speedup, '.1f'):>8} "
            f"{opt(row.max_abs_diff, '.1e'):>10} {opt(row.panels_ms, '.2f'):>10} "
            f"{opt(row.panels_gflops, '.1f'):>8} {opt(row.panels_speedup, '.2f'):>9}")


def _parse(args: argparse.Namespace) -> tuple[list[ExpertShape], list[int]]:
    names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in SHAPES]
    if unknown or not names:
        raise ValueError(f"--shapes {args.shapes!r}: choose from {', '.join(SHAPES)}")
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        raise ValueError(f"--tokens {args.tokens!r}: give integers like 16,256,4096") from None
    if not tokens or min(tokens) < 1:
        raise ValueError(f"--tokens {args.tokens!r}: token counts must be >= 1")
    for name in ("threads", "repeats", "max_gather_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.max_gather_gb > 0:
        raise ValueError("--max-gather-gb must be > 0")
    return [SHAPES[n] for n in names], tokens


def run(args: argparse.Namespace) -> int:
    try:
        shapes, tokens = _parse(args)
    except ValueError as err:
        print(f"moe-lens bench experts: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"fp32, {args.threads} threads; ms per MoE layer (top-k expert MLPs with their "
          "sort, gather and combine; router excluded); speedup = gather / grouped")
    print(format_header())
    rows = [row for shape in shapes for row in bench_shape(shape, tokens, args)]
    if args.json:
        write_json(args.json, {"threads": args.threads, "rows": [asdict(r) for r in rows]})
    return 0
