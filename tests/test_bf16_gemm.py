"""The bf16 panel GEMMs (csrc/bf16_gemm.cpp), on each engine this CPU runs (AMX tiles,
AVX512-BF16), against float64 F.linear on the same bf16 values: plain, SwiGLU epilogue and the
fused MoE layer, their packing and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelens import panel_gemm
from moelens.model.moe import grouped_experts, loop_experts_reference, route

pytestmark = pytest.mark.skipif(not panel_gemm.is_supported(torch.bfloat16),
                                reason="bf16 panel GEMMs need a CPU with AMX-BF16 or AVX512-BF16")
BF16 = torch.bfloat16


@pytest.fixture(params=panel_gemm.bf16_engines() if panel_gemm.is_supported(BF16) else [],
                autouse=True)
def engine(request):
    """Each bf16 engine this CPU runs, pinned for the test."""
    panel_gemm.set_bf16_engine(request.param)
    yield request.param
    panel_gemm.set_bf16_engine(None)


def _bf16(*shape, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(BF16)


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """bf16 outputs of fp32 sums: within a few bf16 roundings (2^-8) of the largest value."""
    return torch.allclose(got.double(), expected, rtol=8e-3, atol=8e-3 * expected.abs().max())


# M around the 16-row tile and 32-row block and past the copied block (512 rows at K = 1024),
# with every remainder of the 8-row VDPBF16PS pass (1-7: 1, 3, 6, 15, 29); N around the 16-column
# panel and the 32-column pair.
@pytest.mark.parametrize("m", [1, 3, 6, 15, 16, 17, 29, 33, 600])
@pytest.mark.parametrize("n,k", [(16, 32), (17, 64), (48, 96), (100, 1024), (40, 2048)])
def test_matches_float64_linear(m, n, k):
    gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    x, w = _bf16(m, k, gen=gen), _bf16(n, k, gen=gen, scale=k ** -0.5)
    got = panel_gemm.linear(x, panel_gemm.pack(w))
    assert got.shape == (m, n) and got.dtype == BF16
    assert _close(got, F.linear(x.double(), w.double()))


@pytest.mark.parametrize("m", [1, 17, 300])
def test_fp32_out_is_the_unrounded_sum(m):
    """fp32_out (the logits' lm_head) stores the fp32 sums: as close to float64 as fp32 allows,
    and the bf16 output is exactly their rounding."""
    gen = torch.Generator().manual_seed(m)
    x, w = _bf16(m, 512, gen=gen), _bf16(100, 512, gen=gen, scale=512 ** -0.5)
    panels = panel_gemm.pack(w)
    got = panel_gemm.linear(x, panels, fp32_out=True)
    assert got.shape == (m, 100) and got.dtype == torch.float32
    expected = F.linear(x.double(), w.double())
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert torch.equal(got.to(BF16), panel_gemm.linear(x, panels))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads, torch_threads):
    gen = torch.Generator().manual_seed(threads)
    x, w = _bf16(150, 320, gen=gen), _bf16(250, 320, gen=gen, scale=0.05)
    torch_threads(threads)
    got = panel_gemm.linear(x, panel_gemm.pack(w))
    assert _close(got, F.linear(x.double(), w.double()))


def test_pack_pairs_rows_and_round_trips():
    w = _bf16(3, 2 * 20, 64, gen=torch.Generator().manual_seed(0))  # [E, 2I, K], I = 20
    for gated in (False, True):
        pw = panel_gemm.pack(w, gated=gated)
        assert torch.equal(pw.unpack(), w) and torch.equal(pw[1].unpack(), w[1])
    pw = panel_gemm.pack(w[0])
    # element (k, n) of a panel at (k // 2) * 32 + n * 2 + k % 2
    flat = pw.panels[0].reshape(-1)
    assert flat[(5 // 2) * 32 + 3 * 2 + 1] == w[0, 3, 5]
    assert panel_gemm.packable(w) and not panel_gemm.packable(w[..., :48])
    with pytest.raises(ValueError, match="multiple of 32, got 48"):
        panel_gemm.pack(w[..., :48])


@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize("inter,k", [(8, 32), (37, 64), (64, 1024)])
def test_swiglu_epilogue_matches_torch(m, inter, k):
    gen = torch.Generator().manual_seed(m + 13 * inter + k)
    x, gate_up = _bf16(m, k, gen=gen), _bf16(2 * inter, k, gen=gen, scale=k ** -0.5)
    got = panel_gemm.swiglu(x, panel_gemm.pack(gate_up, gated=True))
    gate, up = F.linear(x.double(), gate_up.double()).chunk(2, dim=-1)
    assert got.shape == (m, inter) and got.dtype == BF16
    assert _close(got, F.silu(gate) * up)


@pytest.mark.parametrize("t,h,inter,e", [(70, 64, 32, 8), (9, 32, 1024, 4), (600, 1024, 96, 2)])
def test_fused_grouped_experts_match_loop(t, h, inter, e):
    """Ragged and empty experts, one row, and more rows per expert than one copied block."""
    gen = torch.Generator().manual_seed(t + h + inter)
    x = _bf16(t, h, gen=gen)
    gate_up = _bf16(e, 2 * inter, h, gen=gen, scale=h ** -0.5)
    down = _bf16(e, h, inter, gen=gen, scale=inter ** -0.5)
    router = torch.randn(e, h, generator=gen)
    router[e - 1] = -1e3  # the last expert is never picked
    routing = route(x.float(), router, 2, renormalize=False)
    expected = loop_experts_reference(x.double(), routing, gate_up.double(), down.double())
    routing.weights = routing.weights.to(BF16)
    got = grouped_experts(x, routing, panel_gemm.pack(gate_up, gated=True), panel_gemm.pack(down))
    assert got.dtype == BF16
    # h is rounded to bf16 between the two GEMMs, as in the torch path
    assert torch.allclose(got.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max())


def test_bad_inputs_raise_clear_errors():
    pw = panel_gemm.pack(torch.randn(32, 64).to(BF16))
    with pytest.raises(ValueError, match="must be bfloat16"):
        panel_gemm.linear(torch.randn(2, 64), pw)
    with pytest.raises(ValueError, match="K = 32"):
        panel_gemm.linear(torch.randn(2, 32).to(BF16), pw)
    with pytest.raises(ValueError, match="unknown engine 'avx9'"):
        panel_gemm.set_bf16_engine("avx9")
    if "amx" not in panel_gemm.bf16_engines():
        with pytest.raises(ValueError, match="no AMX-BF16"):
            panel_gemm.set_bf16_engine("amx")
