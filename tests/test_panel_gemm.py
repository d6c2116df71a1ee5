"""The CPU panel GEMM against float64 F.linear, its packing, its errors, and the expert service's
weights stored as panels (layer store and grouped experts)."""

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


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    return F.linear(x.double(), w.double(), None if bias is None else bias.double())


# M around the 6-row micro-kernel and the 144-row block, N around the 16-column panel, K past
# the 1024-deep reduction block (so partial sums are reloaded).
@pytest.mark.parametrize("m", [1, 5, 6, 7, 143, 144, 145, 301])
@pytest.mark.parametrize("n,k", [(16, 8), (17, 33), (100, 1024), (48, 1030), (40, 2051)])
def test_matches_float64_linear(m, n, k):
    gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    got = panel_gemm.linear(x, panel_gemm.pack(w), bias)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # fp32 accumulation over k terms of size ~1: error grows like sqrt(k) * eps * |terms|
    assert torch.allclose(got.double(), _reference(x, w, bias), atol=5e-6 * k, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    gen = torch.Generator().manual_seed(threads)
    x, w = torch.randn(150, 300, generator=gen), torch.randn(250, 300, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = panel_gemm.linear(x, panel_gemm.pack(w))
    finally:
        torch.set_num_threads(previous)
    assert torch.allclose(got.double(), _reference(x, w), atol=1e-3, rtol=1e-5)


def test_leading_dims_views_and_empty_rows():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 20, generator=gen)
    pw = panel_gemm.pack(w)
    x = torch.randn(3, 4, 40, generator=gen)[..., ::2]  # [3, 4, 20], not contiguous
    assert torch.allclose(panel_gemm.linear(x, pw).double(), _reference(x, w), atol=1e-4)
    assert panel_gemm.linear(torch.empty(0, 20), pw).shape == (0, 24)
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
    with pytest.raises(ValueError, match="panels \\[P, K, 16\\]"):
        panel_gemm.linear(torch.randn(2, 16), panel_gemm.PanelWeight(torch.zeros(2, 16, 8), 16))


def test_resolve_mode():
    assert panel_gemm.resolve_mode("torch", "cpu", torch.float32) is False
    assert panel_gemm.resolve_mode("panels", "cpu", torch.float32) is True
    assert panel_gemm.resolve_mode("auto", "cpu", torch.bfloat16) is False
    expected = torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert panel_gemm.resolve_mode("auto", "cpu", torch.float32) is expected
    with pytest.raises(ValueError, match="cpu device and float32"):
        panel_gemm.resolve_mode("panels", "cpu", torch.float16)
    with pytest.raises(ValueError, match="must be one of"):
        panel_gemm.resolve_mode("mkl", "cpu", torch.float32)
    with pytest.raises(ValueError, match="--cpu-gemm"):
        ExpertConfig(attention_address="localhost:1", cpu_gemm="fast")


def test_grouped_experts_with_panels_match_loop():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(70, 48, generator=gen)
    gate_up, down = torch.randn(8, 2 * 40, 48, generator=gen), torch.randn(8, 48, 40, generator=gen)
    routing = route(x, torch.randn(8, 48, generator=gen), 2, renormalize=True)
    expected = loop_experts_reference(x, routing, gate_up, down)
    got = grouped_experts(x, routing, panel_gemm.pack(gate_up), panel_gemm.pack(down))
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-5)


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
