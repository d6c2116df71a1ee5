"""Flags and start-up chores every service shares (address, port file, metrics, model path)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="checkpoint folder (config.json + safetensors) or 'default'")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (internal services stay on loopback by default)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0 = pick a free one)")
    parser.add_argument("--port-file", type=Path, default=None,
                        help="write the bound port here once serving (for launchers)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="Prometheus /metrics port (0 = off)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def resolve_model(model: str) -> Path:
    """'default' -> the built-in model (created on first use); otherwise an existing folder."""
    if model == "default":
        from moelens.default_model import ensure_default_model
        return ensure_default_model()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json there; pass a Hugging Face "
                         f"checkpoint folder or 'default'")
    return path


def write_port_file(path: Path | None, port: int) -> None:
    """Atomically publish the bound port so a launcher never reads a half-written file."""
    if path is None:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


def default_num_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))
