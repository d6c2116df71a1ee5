"""Layer residency and streaming: the double buffer hands out exactly the host weights, in order,
step after step; budgets below the minimum fail with the minimum."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moelens.checkpoint import load_weights
from services.expert_gpu import profiling
from services.expert_gpu.layer_store import LayerStore, PackedLayout, plan_residency


@pytest.mark.parametrize("num_resident", [0, 1, 2])
def test_streamed_layers_equal_host_weights(tiny_checkpoints, num_resident):
    _, weights = load_weights(tiny_checkpoints["qwen2_moe"])
    layers = weights.layers * 2  # 4 layers, so 2+ stream through the 2-slot buffer
    store = LayerStore(layers, torch.device("cpu"), num_resident)
    try:
        for _ in range(3):  # steps
            for i, host in enumerate(layers):
                got = store.layer(i)
                for name, tensor in host.tensors().items():
                    assert torch.equal(got.tensors()[name], tensor), (i, name)
                store.release(i)
        wait_s, streamed = store.take_counters()
        assert streamed == 3 * sum(layers[i].num_bytes() for i in range(num_resident, 4))
        assert store.num_streamed == 4 - num_resident
    finally:
        store.close()


def test_packed_layout_round_trip(tiny_checkpoints):
    _, weights = load_weights(tiny_checkpoints["olmoe"])
    layer = weights.layers[0]
    layout = PackedLayout.of(layer)
    flat = layout.pack(layer, torch.empty(layout.numel))
    for name, tensor in layout.unpack(flat).tensors().items():
        assert torch.equal(tensor, layer.tensors()[name])


def test_plan_residency():
    layers = [100, 100, 100, 100]
    assert plan_residency(layers, 50, 50, None) == 4
    assert plan_residency(layers, 50, 50, 500) == 4  # everything fits
    assert plan_residency(layers, 50, 50, 400) == 1  # 2x100 buffer + 1 resident
    assert plan_residency(layers, 50, 50, 300) == 0  # only the double buffer
    with pytest.raises(ValueError, match=r"minimum is"):
        plan_residency(layers, 50, 50, 299)


@pytest.mark.parametrize("num_resident, dense, cold_layers, expected", [
    (4, set(), 10, [0, 1, 2, 3]),  # all of them hold less than the cold bytes
    (4, set(), 2, [0, 1]),  # two layers hold enough
    (4, {0}, 10, [1, 2, 3]),  # the MoE layers the profile's bytes and FLOPs describe
    (0, set(), 10, [0]),  # nothing resident: the streamed layer 0
])
def test_gemm_curve_layers(tiny_checkpoints, monkeypatch, num_resident, dense, cold_layers,
                           expected):
    _, weights = load_weights(tiny_checkpoints["qwen2_moe"])
    layers = weights.layers * 2
    store = LayerStore(layers, torch.device("cpu"), num_resident)
    try:
        monkeypatch.setattr(profiling, "CURVE_COLD_BYTES",
                            sum(store.layer_bytes(i % 4) for i in range(cold_layers)))
        worker = SimpleNamespace(store=store,
                                 cfg=SimpleNamespace(is_moe_layer=lambda i: i not in dense))
        assert profiling.curve_layers(worker) == expected
    finally:
        store.close()
