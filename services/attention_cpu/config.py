"""Configuration of the attention service, validated once from its flags."""

from __future__ import annotations

from dataclasses import dataclass

from moelens.compute_loop import check_pin_mode

TRANSPORTS = ("shm", "grpc")
KV_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class AttentionConfig:
    kv_cache_gb: float = 2.0
    """Host memory for the KV pool (K and V, all layers), GiB."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_dtype: str = "float32"
    """Storage dtype of the pool; 16-bit halves memory, converted to fp32 in the kernel."""
    num_threads: int = 1
    """Kernel threads."""
    pin_threads: str = "auto"
    """Pin the kernel's threads one per CPU: on, off, or auto (when they span every CPU this
    process may use; moelens.compute_loop.pin_compute_team)."""
    transport: str = "shm"
    """Activation transport offered to the expert service: shm (same host) or grpc."""
    max_num_tokens: int = 8192
    """Most new tokens one step may send; sizes the shared-memory slots."""

    def __post_init__(self) -> None:
        if self.kv_cache_gb <= 0:
            raise ValueError(f"--kv-cache-gb must be > 0, got {self.kv_cache_gb}")
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"--block-size must be in [1, 1024], got {self.block_size}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"--kv-dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if self.num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1, got {self.num_threads}")
        check_pin_mode(self.pin_threads)
        if self.transport not in TRANSPORTS:
            raise ValueError(f"--transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.max_num_tokens < 1:
            raise ValueError(f"--max-num-tokens must be >= 1, got {self.max_num_tokens}")
