"""`moe-lens bench attention`: the CPU decode attention kernel against memory bandwidth and torch.

For each (context length, batch, GQA group, KV dtype) it times the native kernel on cold KV (the
pool is several times the last-level cache and calls rotate over disjoint copies, as layers do
in service; blocks are scattered at random), reports KV bytes read per second (median call, and
the best call), the streaming read bandwidth measured in the same run with the same threads,
their ratio (median), the speedup of the median call over the best of the per-sequence torch
SDPA loop (`moelens.model.attention.paged_attention`), and the kernel's own compute ceiling: KV
bytes per second on a short context whose KV stays in cache (`hot`). Where `hot` is not well
above `read`, the point is bound by the kernel's arithmetic, not by memory: a call can only
reach the bandwidth when compute and memory traffic overlap completely.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch

from moelens.kv_cache import pool_shapes
from moelens.model import attention as reference
from services.attention_cpu import kernel

NUM_KV_HEADS = 8
BLOCK_SIZE = 16
COLD_BYTES = 256 << 20  # several times any last-level cache this runs on
HOT_CONTEXT = 256  # tokens per row of the cache-resident (compute ceiling) case
READ_BYTES = 128 << 20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FULL_GRID = ([128, 512, 2048, 8192], [1, 16, 64, 256], [1, 4, 8])
QUICK_GRID = ([512, 4096], [1, 16], [1, 8])


@dataclass
class BenchRow:
    context_len: int
    batch: int
    gqa: int
    head_dim: int
    kv_dtype: str
    kv_gbps: float
    read_gbps: float
    bandwidth_ratio: float
    speedup_vs_torch: float
    kv_gbps_best: float
    """The fastest single call; kv_gbps is the median (robust to neighbours' load)."""
    bandwidth_ratio_best: float
    """kv_gbps_best / read_gbps (read_gbps is itself a best of 3): the undisturbed figure."""
    hot_kv_gbps: float
    """KV GB/s with the KV resident in cache (HOT_CONTEXT tokens per row, same GQA, head_dim,
    dtype and threads, median call): the kernel's compute ceiling at this point."""


@dataclass
class Case:
    """One grid point, with its pool allocated as `copies` disjoint regions."""

    context_len: int
    batch: int
    gqa: int
    head_dim: int
    dtype: torch.dtype

    @property
    def blocks_per_row(self) -> int:
        return -(-self.context_len // BLOCK_SIZE)

    @property
    def kv_bytes(self) -> int:  # K and V bytes one call reads
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.batch * self.context_len * NUM_KV_HEADS * self.head_dim * element


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small grid (about a minute)")
    parser.add_argument("--threads", type=int, default=2, help="threads for kernel and torch")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--contexts", help="comma list of context lengths (overrides the grid)")
    parser.add_argument("--batches", help="comma list of batch sizes (overrides the grid)")
    parser.add_argument("--gqa", help="comma list of GQA group sizes (overrides the grid)")
    parser.add_argument("--kv-dtypes", default="float32,float16",
                        help=f"comma list of {', '.join(DTYPES)}")
    parser.add_argument("--max-kv-gib", type=float, default=1.0,
                        help="skip grid points whose KV (one layer) exceeds this many GiB")
    parser.add_argument("--min-seconds", type=float, default=0.3,
                        help="time each kernel point for at least this long")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")


def _make_inputs(case: Case, copies: int) -> tuple[torch.Tensor, ...]:
    rows_blocks = case.batch * case.blocks_per_row
    k_shape, v_shape = pool_shapes(rows_blocks * copies, NUM_KV_HEADS, BLOCK_SIZE, case.head_dim)
    k_pool = torch.randn(k_shape, dtype=torch.float32).to(case.dtype)  # [N, Hkv, D, B]
    v_pool = torch.randn(v_shape, dtype=torch.float32).to(case.dtype)  # [N, Hkv, B, D]
    q = torch.randn(case.batch, NUM_KV_HEADS * case.gqa, case.head_dim)  # [R, Hq, D]
    # Blocks scattered at random within each copy, as a block manager hands them out.
    tables = [(torch.randperm(rows_blocks) + c * rows_blocks).view(case.batch, -1).int()
              for c in range(copies)]  # each [R, blocks_per_row]
    lens = torch.full((case.batch,), case.context_len, dtype=torch.int32)
    return q, k_pool, v_pool, torch.stack(tables), lens


def _time_kernel(case: Case, min_seconds: float, cold: bool = True) -> tuple[float, float]:
    """(median, best) seconds per call of the native kernel on cold KV (or, with cold=False,
    on one pool that every call reads again: cache-resident when it is small)."""
    copies = max(1, math.ceil(COLD_BYTES / case.kv_bytes)) if cold else 1
    q, k_pool, v_pool, tables, lens = _make_inputs(case, copies)
    scale = case.head_dim ** -0.5
    kernel.paged_attention(q, k_pool, v_pool, tables[0], lens, scale)  # warm-up
    times: list[float] = []
    while len(times) < max(copies, 5) or sum(times) < min_seconds:
        start = time.perf_counter()
        kernel.paged_attention(q, k_pool, v_pool, tables[(len(times) + 1) % copies], lens, scale)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], times[0]


def _hot_gbps(case: Case, threads: int, min_seconds: float) -> float:
    """KV GB/s of the kernel on a cache-resident pool: HOT_CONTEXT tokens for 4 rows per thread
    (enough rows that no context is split), the point's GQA group, head_dim and dtype."""
    hot = Case(min(case.context_len, HOT_CONTEXT), 4 * threads, case.gqa, case.head_dim,
               case.dtype)
    seconds, _ = _time_kernel(hot, min_seconds, cold=False)
    return hot.kv_bytes / seconds / 1e9


def _time_torch(case: Case) -> float:
    """Seconds per call of the per-sequence torch SDPA loop (best of up to 3, within ~2 s)."""
    q, k_pool, v_pool, tables, lens = _make_inputs(case, 1)
    best, spent = float("inf"), 0.0
    for _ in range(3):
        start = time.perf_counter()
        reference.paged_attention(q, k_pool, v_pool, tables[0], lens, case.head_dim ** -0.5)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > 2.0:
            break
    return best


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{flag}: values must be >= 1, got {text!r}")
    return values


def _cases(args: argparse.Namespace) -> list[Case]:
    contexts, batches, groups = QUICK_GRID if args.quick else FULL_GRID
    contexts = _int_list(args.contexts, "--contexts") if args.contexts else contexts
    batches = _int_list(args.batches, "--batches") if args.batches else batches
    groups = _int_list(args.gqa, "--gqa") if args.gqa else groups
    cases = []
    for name in args.kv_dtypes.split(","):
        if name not in DTYPES:
            raise ValueError(f"--kv-dtypes: unknown dtype {name!r}; use {', '.join(DTYPES)}")
        for context_len in contexts:
            for batch in batches:
                for gqa in groups:
                    case = Case(context_len, batch, gqa, args.head_dim, DTYPES[name])
                    if case.kv_bytes <= args.max_kv_gib * 2**30:
                        cases.append(case)
    return cases


def _print_row(row: BenchRow, kernel_ms: float, torch_ms: float) -> None:
    print(f"{row.context_len:>6} {row.batch:>5} {row.gqa:>3} {row.kv_dtype:>8} "
          f"{kernel_ms:>9.3f} {row.kv_gbps:>7.2f} {row.kv_gbps_best:>7.2f} {row.read_gbps:>7.2f} "
          f"{row.bandwidth_ratio:>6.2f} {row.bandwidth_ratio_best:>6.2f} {row.hot_kv_gbps:>7.2f} "
          f"{torch_ms:>9.2f} {row.speedup_vs_torch:>7.1f}x", flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        cases = _cases(args)
    except ValueError as err:
        print(f"moe-lens bench attention: {err}", file=sys.stderr)
        return 2
    kernel.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"backend {kernel.backend()}, {args.threads} threads, Hkv {NUM_KV_HEADS}, "
          f"block {BLOCK_SIZE}; read = streaming read GB/s measured just before each point; "
          f"hot = KV GB/s with the KV in cache ({HOT_CONTEXT} tokens, the compute ceiling)")
    print(f"{'ctx':>6} {'batch':>5} {'gqa':>3} {'kv':>8} {'kernel_ms':>9} {'kv_GB/s':>7} "
          f"{'best':>7} {'read':>7} {'ratio':>6} {'r_best':>6} {'hot':>7} {'torch_ms':>9} "
          f"{'speedup':>8}")
    rows = []
    for case in cases:
        # Neighbours' load drifts during a run, so the reference is taken next to each point.
        read_gbps = kernel.stream_read_gbps(num_bytes=READ_BYTES, num_threads=args.threads,
                                            reps=3)
        seconds, best = _time_kernel(case, args.min_seconds)
        hot_gbps = _hot_gbps(case, args.threads, args.min_seconds)
        torch_seconds = _time_torch(case)
        kv_gbps = case.kv_bytes / seconds / 1e9
        row = BenchRow(case.context_len, case.batch, case.gqa, case.head_dim,
                       str(case.dtype).removeprefix("torch."), kv_gbps, read_gbps,
                       kv_gbps / read_gbps, torch_seconds / seconds, case.kv_bytes / best / 1e9,
                       case.kv_bytes / best / 1e9 / read_gbps, hot_gbps)
        _print_row(row, seconds * 1e3, torch_seconds * 1e3)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
