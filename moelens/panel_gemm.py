"""The CPU device's fp32 GEMM: weights packed once into 16-column panels (csrc/panel_gemm.cpp).

Legend: M rows, K input features, N output features, P = ceil(N / 16) panels.

A decode step gives each expert tens of rows; MKL repacks the weight on every call, which at that
size costs as much as the multiply. Packed once at load, an MoE layer runs 3.1x / 1.45x / 1.04x
faster than with MKL at 4 / 64 / 1024 rows per expert (`moe-lens bench experts`, Zen 3). Model
code calls `linear` for plain tensors and packed weights alike.

When panels are used (`resolve_mode`): "auto" picks them on the CPU device with fp32 weights when
the CPU's best torch kernels are AVX2 (on AVX-512 CPUs MKL's wider kernels are the better choice)
and the extension builds; "panels" insists (an error if impossible), "torch" never uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from moelens import native

PANEL = 16
MODES = ("auto", "panels", "torch")
CSRC_DIR = Path(__file__).resolve().parent / "csrc"


@dataclass(frozen=True)
class PanelWeight:
    """A weight [..., N, K] stored as panels [..., P, K, 16] (columns past N are zero)."""

    panels: torch.Tensor  # [..., P, K, 16]
    out_features: int  # N

    @property
    def in_features(self) -> int:
        return self.panels.shape[-2]

    @property
    def shape(self) -> tuple[int, ...]:
        """The plain weight's shape [..., N, K]."""
        return (*self.panels.shape[:-3], self.out_features, self.in_features)

    def __getitem__(self, index) -> "PanelWeight":
        """Index the leading (expert) dimensions, like the plain [E, N, K] tensor."""
        return PanelWeight(self.panels[index], self.out_features)

    def unpack(self) -> torch.Tensor:
        """The plain weight [..., N, K] (for tests and checks)."""
        plain = self.panels.transpose(-1, -2)  # [..., P, 16, K]
        plain = plain.reshape(*plain.shape[:-3], -1, self.in_features)  # [..., P*16, K]
        return plain[..., :self.out_features, :].contiguous()


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """[..., N, K] -> [..., P, K, 16]."""
    *lead, n, k = shape
    return (*lead, -(-n // PANEL), k, PANEL)


def pack(w: torch.Tensor) -> PanelWeight:
    """Panels of a weight [..., N, K]."""
    *lead, n, k = w.shape
    padded = -(-n // PANEL) * PANEL
    if padded != n:
        w = torch.cat([w, w.new_zeros(*lead, padded - n, k)], dim=-2)
    panels = w.reshape(*lead, padded // PANEL, PANEL, k).transpose(-1, -2)  # [..., P, K, 16]
    return PanelWeight(panels.contiguous(), n)


def linear(x: torch.Tensor, w: torch.Tensor | PanelWeight,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for a plain weight or a PanelWeight. x: [..., K] -> [..., N]."""
    if not isinstance(w, PanelWeight):
        return F.linear(x, w, bias)
    lead = x.shape[:-1]
    y = _extension().linear(x.reshape(-1, x.shape[-1]), w.panels, w.out_features,
                            torch.get_num_threads())  # [M, N]
    if bias is not None:
        y += bias
    return y.view(*lead, w.out_features)


def maybe_pack(w: torch.Tensor | None, enabled: bool) -> torch.Tensor | PanelWeight | None:
    return pack(w) if enabled and w is not None else w


@lru_cache(maxsize=None)
def _load() -> ModuleType | None:
    return native.load_or_none("panel GEMM", "using torch's F.linear", "moelens_panel_gemm",
                               CSRC_DIR, "panel_gemm.cpp")


def _extension() -> ModuleType:
    ext = _load()
    if ext is None:
        raise RuntimeError("the panel GEMM extension could not be built (see the warning)")
    return ext


def is_supported() -> bool:
    """The extension builds here and this CPU has AVX2 + FMA."""
    ext = _load()
    return ext is not None and bool(ext.supported())


def resolve_mode(mode: str, device: str, dtype: torch.dtype) -> bool:
    """Whether to pack weights into panels (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"cpu GEMM mode must be one of {MODES}, got {mode!r}")
    if mode == "torch":
        return False
    usable = device == "cpu" and dtype == torch.float32
    if mode == "panels":
        if not usable:
            raise ValueError(f"panel GEMMs need the cpu device and float32 weights, "
                             f"got {device} and {dtype}")
        if not is_supported():
            raise ValueError("panel GEMMs need a CPU with AVX2 and FMA and a C++ compiler")
        return True
    return usable and torch.backends.cpu.get_cpu_capability() == "AVX2" and is_supported()
