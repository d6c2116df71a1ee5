"""A/B one of our C++ kernels against its sources at a git revision, in one process.

    .venv/bin/python bench/ab_kernels.py panel --base REV [--tokens 16,64,256,1024] [--reps 7]
    .venv/bin/python bench/ab_kernels.py attention --base REV [--configs 8192x8:8,2048x16:8]
        [--dtypes float32,float16] [--reps 5] [--threads 2] [--kv-heads 8] [--head-dim 128]
        [--isa avx512|avx2|scalar]

Both builds are loaded side by side and called alternately, so a drift of the shared machine
moves both columns alike (a separate run per build does not compare on these VMs).
`panel`: one fused MoE expert block (`grouped_swiglu`) with bench-mixtral's expert shapes
(H 1024, I 2048, 8 experts, top-2, random routing), over 4 layers of weights so they come from
memory; prints the median and best ms. `attention`: `paged_attention` on cold KV (Hkv 8 and
head_dim 128 unless given, block 16, random block tables; configs `CTXxBATCH:GQA`); prints KV
GB/s of the median and the best call. The two builds' outputs must agree.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from moelens import native, panel_gemm
from moelens.model.moe import Routing, group_by_expert
from services.attention_cpu import kernel as attention_kernel

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {  # name -> (csrc folder, sources, prefix)
    "panel": ("moelens/csrc", panel_gemm.SOURCES, "ab_panel_gemm"),
    "attention": ("services/attention_cpu/csrc", ("paged_attention.cpp",), "ab_attention"),
}


def checkout_sources(rev: str, folders: list[str], into: Path) -> None:
    """The .cpp/.h files directly in `folders` at `rev`, copied flat into `into`."""
    for folder in folders:
        names = subprocess.run(
            ["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, folder + "/"],
            check=True, capture_output=True, text=True).stdout.split()
        for name in names:
            if name.endswith((".cpp", ".h")):
                text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"],
                                      check=True, capture_output=True).stdout
                (into / Path(name).name).write_bytes(text)


def load_base(kernel: str, rev: str, scratch: Path) -> ModuleType:
    folder, sources, prefix = KERNELS[kernel]
    checkout_sources(rev, [folder, "moelens/csrc/common"], scratch)
    present = tuple(s for s in sources if (scratch / s).exists())  # older revisions had fewer
    # the flag keeps the base build's cache key apart from the working tree's
    return native.load_or_build(prefix, scratch, present, extra_cflags=("-DMOELENS_AB_BASE",))


def timed(fn, reps: int, builds: int) -> list[list[float]]:
    """Seconds of fn(i) for builds i = 0..builds-1, alternating, `reps` rounds."""
    times = [[] for _ in range(builds)]
    for _ in range(reps):
        for i in range(builds):
            start = time.perf_counter()
            fn(i)
            times[i].append(time.perf_counter() - start)
    return times


def ab_panel(exts: list[ModuleType], args: argparse.Namespace) -> None:
    hidden, inter, experts, layers = 1024, 2048, 8, 4
    gen = torch.Generator().manual_seed(0)
    gate_up = [panel_gemm.pack(torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.02,
                               gated=True) for _ in range(layers)]
    down = [panel_gemm.pack(torch.randn(experts, hidden, inter, generator=gen) * 0.02)
            for _ in range(layers)]
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, hidden, generator=gen)  # [T, H]
        weight, expert = torch.randn(tokens, experts, generator=gen).softmax(-1).topk(2)  # [T, 2]
        pairs = group_by_expert(Routing(weight, expert), experts)

        def call(i: int) -> torch.Tensor:
            for layer in range(layers):
                out = exts[i].grouped_swiglu(x, pairs.token, pairs.weight, pairs.counts,
                                             gate_up[layer].panels, down[layer].panels, inter,
                                             args.threads)
            return out

        torch.testing.assert_close(call(0), call(1), atol=1e-4, rtol=1e-4)
        times = timed(call, args.reps, len(exts))
        print(f"{tokens:5d} tokens: " + "   ".join(
            f"{label} {statistics.median(t) * 1e3:7.1f} ms (best {min(t) * 1e3:.1f})"
            for label, t in zip(("base", "current"), times)))


def k_for_build(ext: ModuleType, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K [N, Hkv, B, D] in the layout `ext` reads: transposed per block ([N, Hkv, D, B], since
    the tokens-in-lanes kernel) or as is (builds before it refuse a transposed pool)."""
    kt = k.transpose(-1, -2).contiguous()
    probe = (torch.zeros(1, k.shape[1], k.shape[3]), torch.zeros(1, 1, dtype=torch.int32),
             torch.ones(1, dtype=torch.int32), 1.0, 1, 0)
    try:
        ext.paged_attention(probe[0], kt[:1], v[:1], *probe[1:])
        return kt
    except ValueError:
        return k


def ab_attention(exts: list[ModuleType], args: argparse.Namespace) -> None:
    kv_heads, head_dim, block = args.kv_heads, args.head_dim, 16
    gen = torch.Generator().manual_seed(0)
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for config in args.configs.split(","):
            shape, group = config.split(":")
            ctx, batch = (int(v) for v in shape.split("x"))
            blocks = batch * ctx // block
            k = torch.randn(blocks, kv_heads, block, head_dim, generator=gen).to(dtype)
            v = torch.randn(blocks, kv_heads, block, head_dim, generator=gen).to(dtype)
            tables = torch.randperm(blocks, generator=gen, dtype=torch.int32).view(batch, -1)
            lens = torch.full((batch,), ctx, dtype=torch.int32)
            q = torch.randn(batch, kv_heads * int(group), head_dim, generator=gen)
            isa = attention_kernel.ISA_CODES[args.isa or attention_kernel.available_backends()[0]]
            k_of = [k_for_build(ext, k, v) for ext in exts]

            def call(i: int) -> torch.Tensor:
                return exts[i].paged_attention(q, k_of[i], v, tables, lens, head_dim ** -0.5,
                                               args.threads, isa)

            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(call(0), call(1), atol=tol, rtol=0)
            times = timed(call, args.reps, len(exts))
            kv_bytes = 2 * k.numel() * k.element_size()
            print(f"{str(dtype)[6:]:8s} ctx {ctx:5d} batch {batch:3d} gqa {group}: " + "   ".join(
                f"{label} {kv_bytes / statistics.median(t) / 1e9:5.1f} GB/s "
                f"(best {kv_bytes / min(t) / 1e9:.1f})"
                for label, t in zip(("base", "current"), times)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=sorted(KERNELS))
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--tokens", default="16,64,256,1024", help="panel: token counts")
    parser.add_argument("--configs", default="8192x8:8,2048x16:8,8192x1:8",
                        help="attention: CTXxBATCH:GQA, comma-separated")
    parser.add_argument("--dtypes", default="float32", help="attention: KV dtypes")
    parser.add_argument("--kv-heads", type=int, default=8, help="attention: KV heads")
    parser.add_argument("--head-dim", type=int, default=128, help="attention: head_dim")
    parser.add_argument("--isa", choices=["avx512", "avx2", "scalar"], default=None,
                        help="attention: kernel ISA (default: the best this CPU runs)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    current = panel_gemm._extension() if args.kernel == "panel" \
        else attention_kernel.load_extension()
    with tempfile.TemporaryDirectory() as scratch:
        exts = [load_base(args.kernel, args.base, Path(scratch)), current]
    (ab_panel if args.kernel == "panel" else ab_attention)(exts, args)


if __name__ == "__main__":
    main()
