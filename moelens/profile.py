"""HardwareProfile: the measured machine parameters the performance model runs on.

Services (or `moe-lens profile`) measure them and save a JSON file; the coordinator and
`moe-lens predict` load it. Loading is strict: a missing, negative, non-finite or unknown field
raises ValueError naming the field, because a silently wrong profile gives a silently wrong
token budget.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_POSITIVE = ("io_bandwidth_bytes_per_s", "gemm_slope_s_per_token", "attention_kv_bytes_per_s",
             "host_memory_bandwidth_bytes_per_s", "gemm_layer_flops_per_token",
             "gemm_layer_weight_bytes")
_NON_NEGATIVE = ("gemm_intercept_s", "exchange_fixed_s", "exchange_s_per_byte")


@dataclass(frozen=True)
class HardwareProfile:
    """Measured parameters of one host (+ accelerator) for one layer shape."""

    io_bandwidth_bytes_per_s: float
    """B_IO: host→device weight copy bandwidth (pinned ~1 GB copies on CUDA; on a CPU-only host,
    a packetised memcpy into a separate preallocated buffer)."""
    gemm_intercept_s: float
    """GEMM line of one decoder layer: seconds = intercept + slope · tokens (fixed part)."""
    gemm_slope_s_per_token: float
    """GEMM line of one decoder layer: seconds per token (QKV/O + routed experts)."""
    attention_kv_bytes_per_s: float
    """CPU decode attention: bytes of K+V read per second (all threads the service uses)."""
    host_memory_bandwidth_bytes_per_s: float
    """Streaming read bandwidth of host memory (the ceiling copies and attention share)."""
    exchange_fixed_s: float
    """Activation exchange expert_gpu ↔ attention_cpu, fixed seconds per layer per iteration."""
    exchange_s_per_byte: float
    """Activation exchange, seconds per byte of q/k/v/o crossing."""
    is_accelerator_separate: bool
    """True: GEMMs run on an accelerator and overlap CPU attention. False: a CPU-only host where
    GEMMs and attention share the cores, so their times add."""
    gemm_layer_flops_per_token: float
    """FLOPs per token of the layer the GEMM line was measured on (rescales it to other models)."""
    gemm_layer_weight_bytes: float
    """Weight bytes of the measured layer (rescales the intercept, which is mostly weight reads)."""
    gemm_curve_tokens: tuple[int, ...] = ()
    """Token counts the GEMM of the measured layer was timed at (strictly increasing, from 1
    where the expert service measured it); empty when only the line is known."""
    gemm_curve_s: tuple[float, ...] = ()
    """Seconds at each of gemm_curve_tokens: the performance model interpolates between them
    (the line alone overstates iterations of a few tokens, which read only the experts picked)."""
    device: str = ""
    """Free text: what was measured (e.g. 'cuda:0 NVIDIA A40', 'cpu 2 threads')."""
    dtype: str = "float32"
    """Weight/activation dtype of the measurement (the engine's compute dtype)."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for name in _POSITIVE + _NON_NEGATIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"profile field {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"profile field {name} must be finite, got {value!r}")
            if name in _POSITIVE and value <= 0:
                raise ValueError(f"profile field {name} must be > 0, got {value!r}; re-run "
                                 f"`moe-lens profile` to measure it")
            if value < 0:
                raise ValueError(f"profile field {name} must be >= 0, got {value!r}")
        self._check_curve()
        if not isinstance(self.is_accelerator_separate, bool):
            raise ValueError("profile field is_accelerator_separate must be true or false, got "
                             f"{self.is_accelerator_separate!r}")
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"profile field schema_version is {self.schema_version!r}; this "
                             f"version reads {SCHEMA_VERSION}: re-run `moe-lens profile`")

    def _check_curve(self) -> None:
        """Lists from JSON become tuples; lengths match, tokens rise from 1, seconds are > 0."""
        for name in ("gemm_curve_tokens", "gemm_curve_s"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"profile field {name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        tokens, seconds = self.gemm_curve_tokens, self.gemm_curve_s
        if len(tokens) != len(seconds):
            raise ValueError(f"profile fields gemm_curve_tokens ({len(tokens)}) and gemm_curve_s "
                             f"({len(seconds)}) must have the same length")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in tokens) \
                or any(b <= a for a, b in zip(tokens, tokens[1:])):
            raise ValueError("profile field gemm_curve_tokens must be strictly increasing "
                             f"integers >= 1, got {list(tokens)}")
        if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
               or t <= 0 for t in seconds):
            raise ValueError(f"profile field gemm_curve_s must be finite numbers > 0, got "
                             f"{list(seconds)}")

    @property
    def gemm_flops_per_s(self) -> float:
        """Effective GEMM throughput implied by the slope (FLOP/s)."""
        return self.gemm_layer_flops_per_token / self.gemm_slope_s_per_token

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "HardwareProfile":
        if not isinstance(raw, dict):
            raise ValueError(f"profile must be a JSON object, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"profile has unknown field(s) {', '.join(unknown)}; "
                             f"known fields: {', '.join(sorted(names))}")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING}
        missing = sorted(required - set(raw))
        if missing:
            raise ValueError(f"profile is missing field(s) {', '.join(missing)}; "
                             f"re-run `moe-lens profile` to produce a complete one")
        return cls(**raw)


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    """Write the profile as indented JSON."""
    Path(path).write_text(json.dumps(profile.to_dict(), indent=2, sort_keys=True) + "\n")


def load_profile(path: str | Path) -> HardwareProfile:
    """Read and validate a profile JSON file (ValueError naming the bad field)."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"profile {path} is not valid JSON: {err}") from None
    return HardwareProfile.from_dict(raw)
