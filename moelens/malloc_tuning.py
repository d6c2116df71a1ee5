"""glibc malloc settings for moe-lens processes: freed blocks stay mapped for the next step.

Why: glibc hands a freed block of 128 KiB or more back to the kernel (its mmap threshold, raised
only as blocks of a size get freed) and trims the heap top beyond twice that, so a step's large
temporaries (a layer's fp32 RMSNorm input, q/k/v, the MoE output) were often mapped afresh and
first-touched page by page, call after call. On the 2-vCPU development VM the torch-ops RMSNorm
of [1024, 1024] bf16 mostly took ~2500 page faults a call, none under these settings (what
tests/test_malloc_tuning.py counts); in bench-mixtral's job the expert service took 20-33
thousand faults a second, under a hundred with these settings (sampled from /proc during two
alternated jobs, session 18; the job's throughput moved within the VM's noise). The settings:
M_MMAP_THRESHOLD at glibc's 64-bit maximum, 32 MiB (larger blocks are still mapped per call),
and M_TRIM_THRESHOLD at 1 GiB, so the heap keeps what a step freed.

Environment variables the user sets (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
GLIBC_TUNABLES) win: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2**30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Apply the module's mallopt settings to this process; True when applied (Linux with
    glibc, no user setting in the environment)."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
