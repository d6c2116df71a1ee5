"""The attention service's decode kernel: a C++ extension built on first use, torch as fallback.

Shapes: R query rows, Hq query heads, Hkv KV heads, D head_dim, N pool blocks, B block_size,
T new tokens. Semantics match `moelens.model.attention` (the reference and the fallback).

The extension (csrc/) is compiled on first use and cached (moelens.native). If it cannot be
built (no compiler, no OpenMP) the torch reference runs instead, with one warning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from moelens import native
from moelens.model import attention as reference

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
# Only for a checking run (with libasan preloaded into Python), never in service.
SANITIZE_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer")
ISA_CODES = {"scalar": 0, "avx2": 1, "avx512": 2}


@dataclass
class KernelSettings:
    """Process-wide choices for the kernel."""

    num_threads: int = 0
    """Threads per call; 0 means torch's current thread count (see set_num_threads)."""
    forced_backend: str | None = None
    """"scalar", "avx2", "avx512" or "torch" to pin a path (tests, benchmarks); None: best."""
    sanitize: bool = False
    """Build and load the AddressSanitizer variant (needs libasan preloaded)."""


_settings = KernelSettings()


@lru_cache(maxsize=None)
def load_extension(sanitize: bool = False) -> ModuleType | None:
    """The compiled extension, or None (after one warning) when it cannot be built here."""
    extra = SANITIZE_FLAGS if sanitize else ()
    return native.load_or_none("attention_cpu: C++ attention kernel",
                               "falling back to the much slower torch reference",
                               "moelens_attention", CSRC_DIR, ("paged_attention.cpp",), extra,
                               extra)


def _extension() -> ModuleType | None:
    return load_extension(_settings.sanitize)


def is_native() -> bool:
    """True when calls run the C++ kernel (of any ISA), False on the torch fallback."""
    return backend() != "torch"


def available_backends() -> list[str]:
    """Backends this machine can run, best first; "torch" is always last."""
    ext = _extension()
    return (list(ext.supported_isas()) if ext is not None else []) + ["torch"]


def backend() -> str:
    """"avx512", "avx2", "scalar", or "torch" when the extension could not be built."""
    if _settings.forced_backend is not None:
        return _settings.forced_backend
    return available_backends()[0]


def force_backend(name: str | None) -> None:
    """Pin a backend (None: the best one). Raises ValueError for one this machine cannot run."""
    if name is not None and name not in available_backends():
        raise ValueError(f"backend {name!r} is not available here; choose one of "
                         f"{available_backends()} or None")
    _settings.forced_backend = name


def set_num_threads(num_threads: int) -> None:
    """Threads each kernel call uses (the attention service passes its share of the cores)."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    _settings.num_threads = num_threads


def pin_openmp_team(cpus: list[int]) -> list[int] | None:
    """Pin the calling thread's OpenMP team, thread t to cpus[t] (moelens.compute_loop); None
    on the torch fallback."""
    ext = _extension()
    return None if ext is None else list(ext.pin_openmp_team(cpus))


def get_num_threads() -> int:
    return _settings.num_threads or torch.get_num_threads()


def _check_reference_inputs(v_pool: torch.Tensor, block_tables: torch.Tensor,
                            context_lens: torch.Tensor) -> None:
    """The native kernel's row checks, for the torch fallback (which would index silently)."""
    if bool((context_lens <= 0).any()):
        raise ValueError("context_lens must all be positive")
    needed = (context_lens.long() + v_pool.shape[2] - 1) // v_pool.shape[2]  # [R]
    if int(needed.max()) > block_tables.shape[1]:
        raise ValueError(f"block_tables has {block_tables.shape[1]} columns but a row needs "
                         f"{int(needed.max())} blocks")
    used = torch.arange(block_tables.shape[1])[None, :] < needed[:, None]  # [R, max_blocks]
    blocks = block_tables[used]
    if bool(((blocks < 0) | (blocks >= v_pool.shape[0])).any()):
        raise ValueError(f"block_tables holds an entry outside [0, {v_pool.shape[0]}) "
                         "where a block is needed")


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                    num_threads: int | None = None) -> torch.Tensor:
    """Each query row attends to the first `context_lens[r]` cached tokens of its block table.

    q: [R, Hq, D] fp32; k_pool [N, Hkv, D, B], v_pool [N, Hkv, B, D] (moelens.kv_cache),
    fp32/fp16/bf16; block_tables: [R, max_blocks] int32 (entries past the needed blocks are
    ignored, e.g. -1); context_lens: [R] int32, all > 0. Returns [R, Hq, D] fp32. Bad inputs
    raise ValueError.
    """
    name = backend()
    if name == "torch":
        _check_reference_inputs(v_pool, block_tables, context_lens)
        return reference.paged_attention(q, k_pool, v_pool, block_tables, context_lens, scale)
    return _extension().paged_attention(q, k_pool, v_pool, block_tables, context_lens,
                                        float(scale), num_threads or get_num_threads(),
                                        ISA_CODES[name])


def store_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Write new K/V rows at their slots, converted to the pool dtype.

    k_pool [N, Hkv, D, B], v_pool [N, Hkv, B, D]; k, v: [T, Hkv, D]; slots: [T] int64
    (block * B + offset).
    """
    ext = _extension()
    if ext is None or backend() == "torch":
        if bool(((slots < 0) | (slots >= v_pool.shape[0] * v_pool.shape[2])).any()):
            raise ValueError("a slot is outside the pool")
        reference.store_kv(k_pool, v_pool, k, v, slots)
        return
    ext.store_kv(k_pool, v_pool, k, v, slots)


def stream_read_gbps(num_bytes: int = 256 << 20, num_threads: int | None = None,
                     reps: int = 5) -> float:
    """The machine's streaming read bandwidth (GB/s, best of `reps`) with the kernel's threads.

    Uses a buffer far larger than the last-level cache so the figure is DRAM bandwidth.
    """
    threads = num_threads or get_num_threads()
    name = backend()
    if name != "torch":
        return _extension().stream_read_gbps(num_bytes, threads, reps, ISA_CODES[name])
    buf = torch.ones(num_bytes // 4)  # fallback: torch's vectorised sum
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best / 1e9
