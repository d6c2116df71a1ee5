"""Configuration of the expert service, validated once from its flags."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelens import panel_gemm
from moelens.compute_loop import check_pin_mode

TRANSPORTS = ("shm", "grpc")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ExpertConfig:
    attention_address: str
    """host:port of the attention service."""
    device: str = "cpu"
    """"cpu" or "cuda" (resolved from "auto" by `resolve_device`)."""
    dtype: str = "float32"
    """Compute dtype of the weights; fp32 on CPU (16-bit GEMMs are slow there)."""
    device_memory_gb: float | None = None
    """Device memory budget for weights and workspace; None = all layers resident."""
    num_threads: int = 1
    """Torch intra-op threads."""
    pin_threads: str = "auto"
    """Pin those threads one per CPU: on, off, or auto (on the cpu device, when they span every
    CPU this process may use; moelens.compute_loop.pin_compute_team). A CUDA host's expert
    threads run beside the attention service's, not in turns, so auto leaves them unpinned."""
    transport: str = "shm"
    """Activation transport: shm (same host as the attention service) or grpc."""
    max_num_tokens: int = 8192
    """Most tokens one step computes (sizes the workspace reservation)."""
    cpu_gemm: str = "auto"
    """CPU device GEMMs: "panels" (weights packed once for moelens.panel_gemm, and prefill
    attention on the same micro-kernel), "torch" (F.linear, i.e. MKL, and SDPA), or "auto"
    (panels where they are the faster choice)."""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device_memory_gb is not None and self.device_memory_gb <= 0:
            raise ValueError(f"--device-memory-gb must be > 0, got {self.device_memory_gb}")
        if self.num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1, got {self.num_threads}")
        check_pin_mode(self.pin_threads)
        if self.transport not in TRANSPORTS:
            raise ValueError(f"--transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.cpu_gemm not in panel_gemm.MODES:
            raise ValueError(f"--cpu-gemm must be one of {panel_gemm.MODES}, got "
                             f"{self.cpu_gemm!r}")
        if self.max_num_tokens < 1:
            raise ValueError(f"--max-num-tokens must be >= 1, got {self.max_num_tokens}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def pin_mode(self) -> str:
        """pin_threads with auto resolved for the device (off on CUDA)."""
        return "off" if self.pin_threads == "auto" and self.device != "cpu" else self.pin_threads


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype
