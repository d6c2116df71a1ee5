"""CUDA paths: skipped without a CUDA device, run by bench/gpu_check.sh on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from moelens.checkpoint import load_weights
from moelens.kv_cache import KVPool
from moelens.model.forward import ForwardBatch, LocalPagedAttention, forward
from moelens.model.stages import rope_inv_freq
from services.expert_gpu.layer_store import LayerStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_streamed_layers_on_cuda_equal_host(tiny_checkpoints):
    _, weights = load_weights(tiny_checkpoints["mixtral"])
    layers = weights.layers * 2
    store = LayerStore(layers, torch.device("cuda"), num_resident=1)
    try:
        for _ in range(3):
            for i, host in enumerate(layers):
                got = store.layer(i)
                for name, tensor in host.tensors().items():
                    assert torch.equal(got.tensors()[name].cpu(), tensor), (i, name)
                store.release(i)
    finally:
        store.close()


def test_forward_on_cuda_matches_cpu(tiny_checkpoints):
    cfg, weights = load_weights(tiny_checkpoints["qwen3_moe"])
    prompt = torch.arange(21) % cfg.vocab_size
    batch = ForwardBatch(token_ids=prompt, positions=torch.arange(21), seq_lens=[21],
                         block_tables=[[0, 1, 2]], slots=torch.arange(21),
                         emit_rows=torch.tensor([20]))
    outs = []
    for device in ("cpu", "cuda"):
        w = weights if device == "cpu" else _to(weights, device)
        pool = KVPool.allocate(cfg.num_layers, 4, cfg.num_kv_heads, 8, cfg.head_dim)
        pool = KVPool(k=pool.k.to(device), v=pool.v.to(device))
        b = ForwardBatch(batch.token_ids.to(device), batch.positions.to(device), batch.seq_lens,
                         batch.block_tables, batch.slots, batch.emit_rows.to(device))
        backend = LocalPagedAttention(pool, cfg.head_dim ** -0.5)
        outs.append(forward(cfg, w, b, backend, rope_inv_freq(cfg, device)).cpu())
    assert (outs[0] - outs[1]).abs().max() < 1e-3


def _to(weights, device):
    from moelens.model.weights import LayerWeights, ModelWeights
    return ModelWeights(embed=weights.embed.to(device), final_norm=weights.final_norm.to(device),
                        lm_head=weights.lm_head.to(device),
                        layers=[LayerWeights(**{k: v.to(device) for k, v in l.tensors().items()})
                                for l in weights.layers])
