"""The CPU device's GEMMs: weights packed once into 16-column panels (csrc/panel_gemm.cpp for
fp32, csrc/bf16_gemm.cpp for bf16 on AMX or AVX512-BF16, where each panel's rows are paired).

Legend: M rows, K input features, N output features, P = ceil(N / 16) panels.

A decode step gives each expert tens of rows; MKL repacks the weight on every call, which at that
size costs as much as the multiply. Packed once at load, an MoE layer runs faster than with MKL:
4.0x / 2.1x / 1.25x at 4 / 64 / 1024 rows per expert with the AVX2 kernel on Zen 3, 1.2x / 1.45x
/ 1.02x with the AVX-512 kernel on a Xeon (`moe-lens bench experts`). Model code calls `linear`
for plain tensors and packed weights alike.

A SwiGLU gate/up weight [.., 2I, K] (gate rows, then up rows) is packed "gated": panel p holds
gate columns 8p..8p+7 and the same up columns, so the GEMM's epilogue writes silu(gate) * up
(`swiglu`) and an MoE layer's experts run as one fused call (`grouped_swiglu`).

The same extension holds the expert service's other CPU kernels: causal prefill attention on the
GEMM's micro-kernel (`causal_attention`, csrc/prefill_attention.cpp) and the greedy sampler's
fused argmax + logsumexp (`argmax_logsumexp`, csrc/row_stats.cpp).

The micro-kernel is chosen at run time: 12 x 32 on AVX-512 CPUs, 6 x 16 on AVX2 ones
(`supported_isas`, `set_isa` to pin one); in bf16, AMX tiles where the CPU has AMX-BF16, else
VDPBF16PS on AVX512-BF16 CPUs (`bf16_engines`, `set_bf16_engine`). When panels are used
(`resolve_mode`): "auto" picks them on the CPU device with fp32 weights wherever the extension
builds and with bf16 weights where the CPU has a bf16 engine (bf16 weights whose K is not a
multiple of 32 stay plain, on torch);
"panels" insists (an error if impossible), "torch" never uses them.
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
SOURCES = ("panel_gemm.cpp", "bf16_gemm.cpp", "prefill_attention.cpp", "row_stats.cpp",
           "rms_norm.cpp")
BF16_DEPTH = 32
"""bf16 weights are packed only when their K is a multiple of this: one AMX tile product."""


@dataclass(frozen=True)
class PanelWeight:
    """A weight [..., N, K] stored as panels [..., P, K, 16] (columns past N are zero).

    gated: a gate/up weight (N = 2I) whose panels hold 8 gate and 8 up columns each."""

    panels: torch.Tensor  # [..., P, K, 16]
    out_features: int  # N
    gated: bool = False

    @property
    def in_features(self) -> int:
        return self.panels.shape[-2]

    @property
    def shape(self) -> tuple[int, ...]:
        """The plain weight's shape [..., N, K]."""
        return (*self.panels.shape[:-3], self.out_features, self.in_features)

    def __getitem__(self, index) -> "PanelWeight":
        """Index the leading (expert) dimensions, like the plain [E, N, K] tensor."""
        return PanelWeight(self.panels[index], self.out_features, self.gated)

    def unpack(self) -> torch.Tensor:
        """The plain weight [..., N, K] (for tests and checks)."""
        plain = _unpair(self.panels).transpose(-1, -2)  # [..., P, 16, K]
        lead, k = plain.shape[:-3], self.in_features
        if self.gated:
            pairs = plain.reshape(*lead, -1, 2, PANEL // 2, k)  # [..., P, 2, 8, K]
            gate, up = (pairs.select(-3, j).reshape(*lead, -1, k)[..., :self.out_features // 2, :]
                        for j in (0, 1))  # [..., I, K] each
            return torch.cat([gate, up], dim=-2)
        plain = plain.reshape(*lead, -1, k)  # [..., P*16, K]
        return plain[..., :self.out_features, :].contiguous()


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """[..., N, K] -> [..., P, K, 16]."""
    *lead, n, k = shape
    return (*lead, -(-n // PANEL), k, PANEL)


def pack(w: torch.Tensor, gated: bool = False) -> PanelWeight:
    """Panels of a weight [..., N, K]; gated: of a gate/up weight [..., 2I, K] (module doc)."""
    if gated:
        return _pack_gated(w)
    *lead, n, k = w.shape
    if w.dtype == torch.bfloat16 and k % BF16_DEPTH:
        raise ValueError(f"bfloat16 panels need K a multiple of {BF16_DEPTH}, got {k}")
    padded = -(-n // PANEL) * PANEL
    if padded != n:
        w = torch.cat([w, w.new_zeros(*lead, padded - n, k)], dim=-2)
    panels = w.reshape(*lead, padded // PANEL, PANEL, k).transpose(-1, -2)  # [..., P, K, 16]
    return PanelWeight(_pair(panels), n)


def _pair(panels: torch.Tensor) -> torch.Tensor:
    """bf16 panels in pair order: rows k, k+1 interleaved (csrc/bf16_gemm.cpp); fp32 as they are."""
    if panels.dtype != torch.bfloat16:
        return panels.contiguous()
    *lead, k, width = panels.shape
    pairs = panels.reshape(*lead, k // 2, 2, width).transpose(-1, -2)  # [..., K/2, 16, 2]
    return pairs.reshape(*lead, k, width).contiguous()


def _unpair(panels: torch.Tensor) -> torch.Tensor:
    """The inverse of _pair."""
    if panels.dtype != torch.bfloat16:
        return panels
    *lead, k, width = panels.shape
    return panels.reshape(*lead, k // 2, width, 2).transpose(-1, -2).reshape(*lead, k, width)


def _pack_gated(w: torch.Tensor) -> PanelWeight:
    """[..., 2I, K] -> panels [..., ceil(I / 8), K, 16] of 8 gate then 8 up columns."""
    *lead, n, k = w.shape
    if n % 2:
        raise ValueError(f"a gate/up weight must have an even number of rows, got {n}")
    half, group = n // 2, PANEL // 2
    padded = -(-half // group) * group  # I rounded up to 8
    gate, up = (F.pad(t, (0, 0, 0, padded - half)) for t in w.split(half, dim=-2))  # [..., Ip, K]
    pairs = torch.stack([gate.unflatten(-2, (-1, group)), up.unflatten(-2, (-1, group))],
                        dim=-3)  # [..., P, 2, 8, K]
    interleaved = pairs.reshape(*lead, padded * 2, k)  # rows g0..g7 u0..u7 g8..
    return PanelWeight(pack(interleaved).panels, n, gated=True)


def packable(w: torch.Tensor) -> bool:
    """Whether the panel kernels take this weight [..., N, K]: any fp32 one, a bf16 one whose
    K is a multiple of BF16_DEPTH."""
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and w.shape[-1] % BF16_DEPTH == 0)


def linear(x: torch.Tensor, w: torch.Tensor | PanelWeight, bias: torch.Tensor | None = None,
           *, fp32_out: bool = False) -> torch.Tensor:
    """F.linear(x, w, bias) for a plain weight or a PanelWeight. x: [..., K] -> [..., N], in
    fp32 when `fp32_out` (bf16 panels then store their fp32 sums: no bf16 rounding, no
    conversion pass over the output, which for logits is [rows, vocab])."""
    if not isinstance(w, PanelWeight):
        y = F.linear(x, w, bias)
        return y.float() if fp32_out else y
    if w.gated:
        raise ValueError("a gated gate/up weight is multiplied by swiglu, not linear")
    lead = x.shape[:-1]
    y = _extension().linear(x.reshape(-1, x.shape[-1]), w.panels, w.out_features,
                            torch.get_num_threads(), fp32_out)  # [M, N]
    if bias is not None:
        y += bias
    return y.view(*lead, w.out_features)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor | PanelWeight) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for gate_up [2I, K] (gate rows then up rows), plain or
    gated panels. x: [..., K] -> [..., I]."""
    if not isinstance(gate_up, PanelWeight):
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [..., I] each
        return F.silu(gate, inplace=True).mul_(up)  # in place: no [.., I] temporaries
    if not gate_up.gated:
        raise ValueError("swiglu needs a gate/up weight packed with gated=True")
    inter = gate_up.out_features // 2
    h = _extension().swiglu(x.reshape(-1, x.shape[-1]), gate_up.panels, inter,
                            torch.get_num_threads())  # [M, I]
    return h.view(*x.shape[:-1], inter)


def grouped_swiglu(x: torch.Tensor, pair_token: torch.Tensor, pair_weight: torch.Tensor,
                   counts: torch.Tensor, gate_up: PanelWeight, down: PanelWeight) -> torch.Tensor:
    """An MoE layer's routed experts in one fused call (module doc). x: [T, H]; the R (token,
    expert) pairs sorted by expert: pair_token [R], pair_weight [R], counts [E] -> out [T, H]."""
    if not gate_up.gated or down.gated:
        raise ValueError("grouped_swiglu needs a gated gate/up weight and a plain down weight")
    out = _extension().grouped_swiglu(x, pair_token, pair_weight.float(), counts, gate_up.panels,
                                      down.panels, gate_up.out_features // 2,
                                      torch.get_num_threads())
    return out.to(x.dtype)  # the bf16 kernel sums the experts in fp32


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                     scale: float) -> torch.Tensor:
    """Causal attention within each prompt of a packed batch of new tokens, on the panel
    micro-kernel (csrc/prefill_attention.cpp); moelens.model.attention.prefill_attention is the
    torch equivalent. q: [T, Hq, D]; k, v: [T, Hkv, D]; seq_lens sum to T -> [T, Hq, D]."""
    return _extension().causal_attention(q, k, v, torch.tensor(seq_lens, dtype=torch.int64),
                                         scale, torch.get_num_threads())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """moelens.model.stages.rms_norm's math in one pass per row (csrc/rms_norm.cpp): x [..., N]
    and weight [N], both float32 or both bfloat16 CPU tensors -> [..., N]."""
    return _extension().rms_norm(x, weight, eps, torch.get_num_threads())


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.argmax and torch.logsumexp over the last dim of fp32 CPU logits [R, V], fused
    (csrc/row_stats.cpp) -> ([R] int64, [R])."""
    return _extension().argmax_logsumexp(logits, torch.get_num_threads())


def maybe_pack(w: torch.Tensor | None, enabled: bool,
               gated: bool = False) -> torch.Tensor | PanelWeight | None:
    return pack(w, gated) if enabled and w is not None and packable(w) else w


@lru_cache(maxsize=None)
def _load() -> ModuleType | None:
    return native.load_or_none("panel GEMM", "using torch's F.linear, SDPA and reductions",
                               "moelens_panel_gemm", CSRC_DIR, SOURCES)


def _extension() -> ModuleType:
    ext = _load()
    if ext is None:
        raise RuntimeError("the panel GEMM extension could not be built (see the warning)")
    return ext


@lru_cache(maxsize=None)  # asked per layer (stages.rms_norm); fixed for the process
def is_supported(dtype: torch.dtype = torch.float32) -> bool:
    """The extension builds here and this CPU runs its kernels for `dtype`: AVX2 + FMA for
    float32, AMX-BF16 or AVX512-BF16 for bfloat16."""
    ext = _load()
    if ext is None or dtype not in (torch.float32, torch.bfloat16):
        return False
    return bool(ext.supported() if dtype == torch.float32 else ext.bf16_supported())


def resolve_mode(mode: str, device: str, dtype: torch.dtype) -> bool:
    """Whether to pack weights into panels (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"cpu GEMM mode must be one of {MODES}, got {mode!r}")
    if mode == "torch":
        return False
    usable = device == "cpu" and dtype in (torch.float32, torch.bfloat16)
    if mode == "panels":
        if not usable:
            raise ValueError(f"panel GEMMs need the cpu device and float32 or bfloat16 weights, "
                             f"got {device} and {dtype}")
        if not is_supported(dtype):
            raise ValueError("panel GEMMs need a C++ compiler and a CPU with AVX2 and FMA "
                             "(float32) or AMX-BF16 / AVX512-BF16 (bfloat16)")
        return True
    return usable and is_supported(dtype)


def supported_isas() -> list[str]:
    """The micro-kernels this CPU runs, best first: "avx512" (12 x 32 tiles), "avx2" (6 x 16)."""
    return list(_extension().supported_isas()) if is_supported() else []


def set_isa(name: str | None) -> str:
    """Pin the micro-kernel ("avx512" or "avx2"; None: the best this CPU has, the default);
    returns the one now in use. For tests and A/B runs."""
    return _extension().set_isa(name or "")


def bf16_engines() -> list[str]:
    """The bf16 engines this CPU runs, best first: "amx" (tiles), "avx512_bf16" (VDPBF16PS)."""
    return list(_extension().bf16_engines()) if is_supported(torch.bfloat16) else []


def set_bf16_engine(name: str | None) -> str:
    """Pin the bf16 engine ("amx" or "avx512_bf16"; None: the best this CPU has, the default);
    returns the one now in use. For tests and A/B runs."""
    return _extension().set_bf16_engine(name or "")


def pin_openmp_team(cpus: list[int]) -> list[int] | None:
    """Pin the calling thread's OpenMP team, thread t to cpus[t] (moelens.compute_loop); None
    when the extension could not be built here."""
    ext = _load()
    return None if ext is None else list(ext.pin_openmp_team(cpus))
