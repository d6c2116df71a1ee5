"""`moe-lens make-model`: write a deterministic synthetic checkpoint in Hugging Face layout."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moelens.model_presets import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    choices = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), metavar="NAME",
                        help=f"architecture to build ({choices})")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder to create (must not exist, or be empty)")
    parser.add_argument("--seed", type=int, default=0,
                        help="weights depend only on preset, seed and tensor name (default 0)")


def run(args: argparse.Namespace) -> int:
    # Imported here so `moe-lens --help` does not pay for importing transformers.
    from moelens.default_model import make_model

    if args.seed < 0:
        print("make-model: --seed must be >= 0", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        out = make_model(args.preset, args.out, seed=args.seed)
    except (FileExistsError, ValueError) as exc:
        print(f"make-model: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {args.preset} (seed {args.seed}) to {out}: {size / 1e6:.1f} MB in "
          f"{time.perf_counter() - start:.1f} s")
    return 0
