"""What every peer script shares: the flags, the prompts, and the result file.

The peer scripts run in their own virtual environments (one per peer, none with moe-lens
installed), so this file depends on numpy alone. The prompts are the ones `moe-lens bench
throughput --workload fixed` sends for the same seed: random ids, drawn the same way.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class PeerRow:
    batch_size: int
    num_requests: int
    num_output_tokens: int
    elapsed_s: float

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s


@dataclass
class PeerResult:
    system: str
    version: str
    threads: int
    prompt_len: int
    gen_len: int
    notes: str = ""
    rows: list[PeerRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        for row, raw in zip(self.rows, out["rows"]):
            raw["output_tokens_per_s"] = row.output_tokens_per_s
        out["machine"] = platform.processor() or platform.machine()
        return out


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the bench-mixtral checkpoint folder")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma list")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True, help="write the result here")


def batch_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes {text!r}: give positive integers like 1,8,32")
    return sizes


def make_prompts(num_requests: int, prompt_len: int, vocab_size: int,
                 seed: int = 0) -> list[list[int]]:
    """Random ids in [0, vocab_size), as moelens_cli.bench_common.make_requests draws them."""
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(0, vocab_size, prompt_len).tolist() for _ in range(num_requests)]


def vocab_size_of(model_dir: str) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def write_result(path: str, result: PeerResult) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def record(result: PeerResult, row: PeerRow, path: str) -> None:
    """Add a measured row, print it and rewrite the result file (a long run keeps what it has)."""
    result.rows.append(row)
    print(f"{result.system} bs={row.batch_size}: {row.output_tokens_per_s:.1f} out tok/s "
          f"({row.num_output_tokens} tokens in {row.elapsed_s:.2f} s)", flush=True)
    write_result(path, result)
