"""Collect the peer results and ours into bench/results/peers.md (table) and peers.png (chart).

Reads every *.json under --raw: a peer's file (from run_*.py: system, rows of batch_size and
output_tokens_per_s) or one of ours (from `moe-lens bench throughput --json`, named
ours_bs<N>.json, whose config carries the batch limit). Runs in the main venv (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

OURS = "MoE-Lens (moe-lens bench throughput)"


def load_results(raw: Path) -> dict[str, dict[int, float]]:
    """system -> {batch size: output tokens/s}; ours under OURS, keyed by its request count."""
    table: dict[str, dict[int, float]] = {}
    for path in sorted(raw.glob("*.json")):
        data = json.loads(path.read_text())
        if "system" in data:
            name = f"{data['system']} {data.get('version', '')}".strip()
            for row in data["rows"]:
                table.setdefault(name, {})[int(row["batch_size"])] = \
                    float(row["output_tokens_per_s"])
        elif "output_tokens_per_s" in data:
            found = re.search(r"bs(\d+)", path.stem)
            size = int(found.group(1)) if found else int(data["num_requests"])
            table.setdefault(OURS, {})[size] = float(data["output_tokens_per_s"])
    return table


def markdown(table: dict[str, dict[int, float]], note: str) -> str:
    sizes = sorted({s for row in table.values() for s in row})
    lines = ["# Peers: bench-mixtral, 128 prompt + 64 generated tokens, out tok/s", "",
             note, "",
             "| system | " + " | ".join(f"bs={s}" for s in sizes) + " | best |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for name, row in table.items():
        cells = [f"{row[s]:.1f}" if s in row else "–" for s in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {max(row.values()):.1f} |")
    best_peer = max((v for n, r in table.items() if n != OURS for v in r.values()),
                    default=None)
    if OURS in table and best_peer:
        ours = max(table[OURS].values())
        lines += ["", f"Ours at its best / best peer measured in this table at its best: "
                      f"{ours / best_peer:.2f}x "
                      f"({ours:.1f} vs {best_peer:.1f} out tok/s)."]
    return "\n".join(lines) + "\n"


def chart(table: dict[str, dict[int, float]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted({s for row in table.values() for s in row})
    width = 0.8 / max(1, len(table))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, (name, row) in enumerate(table.items()):
        xs = [i + k * width for i, s in enumerate(sizes) if s in row]
        ax.bar(xs, [row[s] for s in sizes if s in row], width, label=name)
    ax.set_xticks([i + width * (len(table) - 1) / 2 for i in range(len(sizes))])
    ax.set_xticklabels([f"bs={s}" for s in sizes])
    ax.set_ylabel("output tokens/s (higher is better)")
    ax.set_title("bench-mixtral on 2 CPU cores, fp32: p=128, g=64")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="folder of result JSON files")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--note", default="", help="a line under the title (machine, load)")
    args = parser.parse_args()
    table = load_results(args.raw)
    if not table:
        print(f"report: no results in {args.raw}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "peers.md").write_text(markdown(table, args.note))
    chart(table, args.out_dir / "peers.png")
    print(f"wrote {args.out_dir / 'peers.md'} and {args.out_dir / 'peers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
