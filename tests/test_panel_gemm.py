"""The CPU panel GEMM against float64 F.linear, its packing, its errors, its fused SwiGLU and MoE
epilogues against torch, and the expert service's weights stored as panels (layer store and
grouped experts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelens import panel_gemm
from moelens.checkpoint import load_weights
from moelens.model.moe import grouped_experts, loop_experts_reference, route
from services.expert_gpu.config import ExpertConfig
from services.expert_gpu.layer_store import LayerStore

pytestmark = pytest.mark.skipif(not panel_gemm.is_supported(),
                                reason="panel GEMM needs x86-64 with AVX2 and FMA")


@pytest.fixture(params=panel_gemm.supported_isas())
def isa(request):
    """Each micro-kernel this CPU runs, pinned for the test."""
    panel_gemm.set_isa(request.param)
    yield request.param
    panel_gemm.set_isa(None)


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    return F.linear(x.double(), w.double(), None if bias is None else bias.double())


# M around the 6- and 12-row micro-kernels and the 144- and 576-row blocks, N around the
# 16-column panel and 32-column pair, K past the 128- and 1024-deep reduction blocks (so partial
# sums are carried over).
@pytest.mark.parametrize("m", [1, 5, 6, 7, 12, 13, 143, 144, 145, 301, 577])
@pytest.mark.parametrize("n,k", [(16, 8), (17, 33), (48, 257), (100, 1024), (48, 1030),
                                 (40, 2051)])
def test_matches_float64_linear(m, n, k, isa):
    gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    got = panel_gemm.linear(x, panel_gemm.pack(w), bias)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # fp32 accumulation over k terms of size ~1: error grows like sqrt(k) * eps * |terms|
    assert torch.allclose(got.double(), _reference(x, w, bias), atol=5e-6 * k, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads, isa, torch_threads):
    gen = torch.Generator().manual_seed(threads)
    x, w = torch.randn(150, 300, generator=gen), torch.randn(250, 300, generator=gen)
    torch_threads(threads)
    got = panel_gemm.linear(x, panel_gemm.pack(w))
    assert torch.allclose(got.double(), _reference(x, w), atol=1e-3, rtol=1e-5)


def test_leading_dims_views_and_empty_rows():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 20, generator=gen)
    pw = panel_gemm.pack(w)
    x = torch.randn(3, 4, 40, generator=gen)[..., ::2]  # [3, 4, 20], not contiguous
    assert torch.allclose(panel_gemm.linear(x, pw).double(), _reference(x, w), atol=1e-4)
    assert panel_gemm.linear(torch.empty(0, 20), pw).shape == (0, 24)
    assert torch.equal(panel_gemm.linear(x, pw, fp32_out=True), panel_gemm.linear(x, pw))
    assert torch.equal(panel_gemm.linear(x, w), F.linear(x, w))  # plain weights: F.linear


def test_pack_layout_and_expert_indexing():
    w = torch.arange(3 * 20 * 5, dtype=torch.float32).reshape(3, 20, 5)  # [E, N, K]
    pw = panel_gemm.pack(w)
    assert pw.panels.shape == (3, 2, 5, 16) and pw.shape == (3, 20, 5)
    assert panel_gemm.packed_shape((3, 20, 5)) == (3, 2, 5, 16)
    assert pw.panels[1, 0, 2, 3] == w[1, 3, 2]  # panel 0, k 2, column 3
    assert torch.all(pw.panels[:, 1, :, 4:] == 0)  # columns past N are zero
    assert torch.equal(pw.unpack(), w) and torch.equal(pw[2].unpack(), w[2])


def test_bad_inputs_raise_clear_errors():
    pw = panel_gemm.pack(torch.randn(32, 16))
    with pytest.raises(ValueError, match="must be float32"):
        panel_gemm.linear(torch.randn(2, 16, dtype=torch.float64), pw)
    with pytest.raises(ValueError, match="K = 16"):
        panel_gemm.linear(torch.randn(2, 15), pw)
    with pytest.raises(ValueError, match="cannot hold 64"):
        panel_gemm.linear(torch.randn(2, 16), panel_gemm.PanelWeight(pw.panels, 64))
    with pytest.raises(ValueError, match="panels must be \\[P, K, 16\\]"):
        panel_gemm.linear(torch.randn(2, 16), panel_gemm.PanelWeight(torch.zeros(2, 16, 8), 16))


def test_resolve_mode():
    assert panel_gemm.resolve_mode("torch", "cpu", torch.float32) is False
    assert panel_gemm.resolve_mode("panels", "cpu", torch.float32) is True
    assert panel_gemm.resolve_mode("auto", "cpu", torch.bfloat16) is panel_gemm.is_supported(
        torch.bfloat16)
    assert panel_gemm.resolve_mode("auto", "cuda", torch.bfloat16) is False
    assert panel_gemm.resolve_mode("auto", "cpu", torch.float32) is True
    with pytest.raises(ValueError, match="cpu device and float32 or bfloat16"):
        panel_gemm.resolve_mode("panels", "cpu", torch.float16)
    with pytest.raises(ValueError, match="must be one of"):
        panel_gemm.resolve_mode("mkl", "cpu", torch.float32)
    with pytest.raises(ValueError, match="--cpu-gemm"):
        ExpertConfig(attention_address="localhost:1", cpu_gemm="fast")


def _swiglu_reference(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x.double(), gate_up.double()).chunk(2, dim=-1)
    return F.silu(gate) * up


def test_gated_pack_round_trips():
    w = torch.randn(3, 2 * 20, 5)  # [E, 2I, K], I = 20: not a multiple of 8
    pw = panel_gemm.pack(w, gated=True)
    assert pw.panels.shape == (3, 3, 5, 16) and pw.gated and pw.shape == (3, 40, 5)
    assert pw.panels[1, 0, 2, 3] == w[1, 3, 2] and pw.panels[1, 0, 2, 11] == w[1, 23, 2]
    assert torch.all(pw.panels[:, 2, :, 4:8] == 0) and torch.all(pw.panels[:, 2, :, 12:] == 0)
    assert torch.equal(pw.unpack(), w) and torch.equal(pw[2].unpack(), w[2])
    with pytest.raises(ValueError, match="even number of rows"):
        panel_gemm.pack(torch.randn(7, 4), gated=True)
    with pytest.raises(ValueError, match="swiglu, not linear"):
        panel_gemm.linear(torch.randn(2, 5), pw[0])
    with pytest.raises(ValueError, match="gated=True"):
        panel_gemm.swiglu(torch.randn(2, 5), panel_gemm.pack(w[0]))


# I around the 8-column half panel, K past the 128- and 1024-deep blocks (partial sums carried
# over), M past the 144-row block.
@pytest.mark.parametrize("m", [1, 7, 145])
@pytest.mark.parametrize("inter,k", [(8, 16), (37, 64), (64, 1030), (21, 2051)])
def test_swiglu_epilogue_matches_torch(m, inter, k, isa):
    gen = torch.Generator().manual_seed(m + 13 * inter + k)
    x = torch.randn(m, k, generator=gen)
    gate_up = torch.randn(2 * inter, k, generator=gen) * k ** -0.5  # [2I, K]
    got = panel_gemm.swiglu(x, panel_gemm.pack(gate_up, gated=True))
    assert got.shape == (m, inter) and got.dtype == torch.float32
    assert torch.allclose(got.double(), _swiglu_reference(x, gate_up), atol=1e-5, rtol=1e-5)
    assert torch.equal(panel_gemm.swiglu(x, gate_up), F.silu(F.linear(x, gate_up)[:, :inter])
                       * F.linear(x, gate_up)[:, inter:])  # plain weights: torch


def test_swiglu_epilogue_saturates_like_torch():
    # gate pre-activations from -200 to 200 (exp clamps at +-88): silu -> 0 and -> x, no inf/nan
    x = torch.linspace(-200, 200, 401)[:, None]  # [401, 1]
    gate_up = torch.tensor([[1.0], [1.0]])  # gate = up = x
    got = panel_gemm.swiglu(x, panel_gemm.pack(gate_up, gated=True))
    assert torch.isfinite(got).all()
    assert torch.allclose(got, F.silu(x) * x, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("t,h,inter,e", [(70, 48, 40, 8), (9, 20, 1030, 4), (300, 1040, 24, 6),
                                         (300, 1024, 2048, 2), (400, 64, 2048, 4)])
def test_fused_grouped_experts_match_loop(t, h, inter, e, isa):
    """The fused MoE call (gather, SwiGLU epilogue, weighted scatter-add) against the per-token
    loop on plain weights: ragged and empty experts, H off the panel width, I or H past KC, and
    more rows per expert than one packed block of x holds (for both depths, H and I), and
    experts whose row counts take different blockings (the shared x buffer serves them all)."""
    gen = torch.Generator().manual_seed(t + h + inter)
    x = torch.randn(t, h, generator=gen)
    gate_up = torch.randn(e, 2 * inter, h, generator=gen) * h ** -0.5
    down = torch.randn(e, h, inter, generator=gen) * inter ** -0.5
    router = torch.randn(e, h, generator=gen)
    router[e - 1] = -1e3  # the last expert is never picked
    routing = route(x, router, 2, renormalize=False)
    expected = loop_experts_reference(x, routing, gate_up, down)
    got = grouped_experts(x, routing, panel_gemm.pack(gate_up, gated=True), panel_gemm.pack(down))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_fused_grouped_experts_reject_bad_pairs():
    gate_up = panel_gemm.pack(torch.randn(2, 8, 4), gated=True)  # E = 2, I = 4, H = 4
    down = panel_gemm.pack(torch.randn(2, 4, 4))
    x, weight = torch.randn(3, 4), torch.ones(2)

    def call(tokens, counts, up=gate_up):
        return panel_gemm.grouped_swiglu(x, torch.tensor(tokens), weight, torch.tensor(counts),
                                         up, down)

    with pytest.raises(ValueError, match="names token 3, x has 3"):
        call([0, 3], [1, 1])
    with pytest.raises(ValueError, match="counts sum to 3, there are 2 pairs"):
        call([0, 1], [1, 2])
    with pytest.raises(ValueError, match="number of experts"):
        call([0, 1], [2])
    with pytest.raises(ValueError, match="gated gate/up weight and a plain down"):
        call([0, 1], [1, 1], up=down)


@pytest.mark.parametrize("num_resident", [0, 2])
def test_layer_store_hands_out_panels_of_the_host_weights(tiny_checkpoints, num_resident):
    _, weights = load_weights(tiny_checkpoints["qwen2_moe"])
    layers = weights.layers * 2
    store = LayerStore(layers, torch.device("cpu"), num_resident, panels=True)
    try:
        for _ in range(2):
            for i, host in enumerate(layers):
                got = store.layer(i).tensors()
                assert isinstance(got["qkv_proj"], panel_gemm.PanelWeight)
                assert isinstance(got["input_norm"], torch.Tensor)
                assert all(isinstance(got[name], panel_gemm.PanelWeight) for name in got
                           if name.endswith(("gate_up", "down")))
                for name, tensor in host.tensors().items():
                    plain = got[name].unpack() if isinstance(got[name], panel_gemm.PanelWeight) \
                        else got[name]
                    assert torch.equal(plain, tensor), (i, name)
                store.release(i)
    finally:
        store.close()
