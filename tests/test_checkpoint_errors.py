"""The loader's error paths: each names what is wrong and what was expected."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelens.checkpoint import load_weights
from moelens.config import load_config, parse_config


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_type_lists_supported(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["mixtral"], tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama'.*mixtral.*olmoe.*qwen2_moe"):
        load_config(d)


def test_missing_tensor_is_named(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["mixtral"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.block_sparse_moe.experts.3.w2.weight'"):
        load_weights(d)


def test_wrong_shape_gives_both_shapes(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["qwen2_moe"], tmp_path / "q")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(60, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj.weight' has shape \[60, 64\], expected \[64, 64\]"):
        load_weights(d)


def test_corrupt_safetensors(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["olmoe"], tmp_path / "o")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(b"\xff" * 16 + data[16:1000])
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        load_weights(d)


def test_sharded_checkpoint_loads_identically(tiny_checkpoints, tmp_path):
    from tiny_models import load_reference
    model = load_reference(tiny_checkpoints["qwen3_moe"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, a = load_weights(tiny_checkpoints["qwen3_moe"])
    _, b = load_weights(tmp_path / "sharded")
    for la, lb in zip(a.layers, b.layers):
        for name, t in la.tensors().items():
            assert torch.equal(t, lb.tensors()[name]), name


def test_config_quirks():
    base = dict(model_type="mixtral", vocab_size=10, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                num_experts_per_tok=1, intermediate_size=4, head_dim=None)
    assert parse_config({**base, "rope_theta": 5.0}).rope_theta == 5.0
    cfg = parse_config({**base, "rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}})
    assert cfg.rope_theta == 7.0 and cfg.head_dim == 4
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        parse_config({**base, "rope_parameters": {"rope_theta": 7.0, "rope_type": "yarn"}})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        parse_config({**base, "rope_theta": 1.0, "num_experts_per_tok": 3})
