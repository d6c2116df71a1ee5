"""Start the three services as real processes for a test module, and stop them after."""

from __future__ import annotations

import contextlib
from pathlib import Path

from moelens_cli.launcher import LaunchOptions, start_local_services


@contextlib.contextmanager
def running_services(model_dir: Path, **options):
    """Yields LocalServices (addresses of coordinator, expert, attention); always stops them."""
    # float32 on every device: the tests compare with HF transformers' float32 outputs, and on a
    # CUDA machine `--dtype auto` would pick bfloat16
    defaults = dict(kv_cache_gb=0.05, block_size=8, expert_threads=1, attention_threads=1,
                    dtype="float32", startup_timeout_s=300.0)
    services = start_local_services(LaunchOptions(model=str(model_dir), **{**defaults, **options}))
    try:
        yield services
    finally:
        services.stop()
