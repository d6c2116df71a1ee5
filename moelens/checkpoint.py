"""Read Hugging Face MoE checkpoints (config.json + safetensors, single file or sharded).

Tensors are read by their on-disk names. A registry maps `model_type` to a `FamilySpec` naming the
tensors of that family; everything else (shapes, fusing q/k/v and gate/up, stacking experts into
[E, ...]) is shared. Every tensor is checked against the shape the config implies, so a wrong or
truncated checkpoint fails at load naming the tensor, never later with a shape error mid-forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moelens.config import QK_NORM_FULL, QK_NORM_NONE, ModelConfig, load_config
from moelens.model.weights import LayerWeights, ModelWeights


@dataclass(frozen=True)
class FamilySpec:
    """On-disk tensor names of one family, relative to `model.layers.{i}.`."""

    moe_prefix: str  # "block_sparse_moe." or "mlp."
    expert_names: tuple[str, str, str]  # (gate, up, down) under "experts.{e}."
    shared_expert_prefix: str = "mlp.shared_expert."


FAMILY_SPECS: dict[str, FamilySpec] = {
    "mixtral": FamilySpec("block_sparse_moe.", ("w1", "w3", "w2")),
    "qwen2_moe": FamilySpec("mlp.", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": FamilySpec("mlp.", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": FamilySpec("mlp.", ("gate_proj", "up_proj", "down_proj")),
}


class CheckpointReader:
    """Lazy access to the tensors of all safetensors files of a checkpoint folder."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.name_to_file = self._index(model_dir)
        self._handles: dict[str, object] = {}

    @staticmethod
    def _index(model_dir: Path) -> dict[str, str]:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
        name_to_file = {}
        for path in files:
            for name in CheckpointReader._open(path).keys():
                name_to_file[name] = path.name
        return name_to_file

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read safetensors file {path}: {err}") from None

    def has(self, name: str) -> bool:
        return name in self.name_to_file

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if name not in self.name_to_file:
            raise ValueError(f"checkpoint {self.model_dir} is missing tensor {name!r} "
                             f"(expected shape {list(shape)})")
        file = self.name_to_file[name]
        if file not in self._handles:
            self._handles[file] = self._open(self.model_dir / file)
        try:
            tensor = self._handles[file].get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read tensor {name!r} from {file}: {err}") from None
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {list(tensor.shape)}, "
                             f"expected {list(shape)} from config.json")
        return tensor.to(dtype)


def _load_attention(r: CheckpointReader, cfg: ModelConfig, p: str, dtype) -> dict:
    h, q, kv, d = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.head_dim
    a = p + "self_attn."
    out = {
        "qkv_proj": torch.cat([r.get(a + "q_proj.weight", (q, h), dtype),
                               r.get(a + "k_proj.weight", (kv, h), dtype),
                               r.get(a + "v_proj.weight", (kv, h), dtype)]),
        "o_proj": r.get(a + "o_proj.weight", (h, q), dtype),
        "input_norm": r.get(p + "input_layernorm.weight", (h,), dtype),
        "post_attention_norm": r.get(p + "post_attention_layernorm.weight", (h,), dtype),
    }
    if cfg.qkv_bias:
        out["qkv_bias"] = torch.cat([r.get(a + "q_proj.bias", (q,), dtype),
                                     r.get(a + "k_proj.bias", (kv,), dtype),
                                     r.get(a + "v_proj.bias", (kv,), dtype)])
    if cfg.qk_norm != QK_NORM_NONE:
        full = cfg.qk_norm == QK_NORM_FULL
        out["q_norm"] = r.get(a + "q_norm.weight", (q if full else d,), dtype)
        out["k_norm"] = r.get(a + "k_norm.weight", (kv if full else d,), dtype)
    return out


def _load_swiglu(r: CheckpointReader, prefix: str, names: tuple[str, str, str], h: int,
                 inter: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2*inter, H], down [H, inter]) of one SwiGLU MLP."""
    gate = r.get(prefix + names[0] + ".weight", (inter, h), dtype)
    up = r.get(prefix + names[1] + ".weight", (inter, h), dtype)
    down = r.get(prefix + names[2] + ".weight", (h, inter), dtype)
    return torch.cat([gate, up]), down


def _load_experts(r: CheckpointReader, cfg: ModelConfig, spec: FamilySpec, p: str, dtype) -> dict:
    h, i, e = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts
    m = p + spec.moe_prefix
    fused = m + "experts.gate_up_proj"
    if r.has(fused):  # transformers-5 in-memory layout saved as is
        gate_up = r.get(fused, (e, 2 * i, h), dtype)
        down = r.get(m + "experts.down_proj", (e, h, i), dtype)
    else:
        pairs = [_load_swiglu(r, f"{m}experts.{x}.", spec.expert_names, h, i, dtype)
                 for x in range(e)]
        gate_up = torch.stack([gu for gu, _ in pairs])  # [E, 2I, H]
        down = torch.stack([dn for _, dn in pairs])  # [E, H, I]
    out = {"router": r.get(m + "gate.weight", (e, h), dtype),
           "experts_gate_up": gate_up, "experts_down": down}
    if cfg.shared_expert_intermediate_size:
        out["shared_gate_up"], out["shared_down"] = _load_swiglu(
            r, p + spec.shared_expert_prefix, ("gate_proj", "up_proj", "down_proj"), h,
            cfg.shared_expert_intermediate_size, dtype)
        out["shared_expert_gate"] = r.get(p + "mlp.shared_expert_gate.weight", (1, h), dtype)
    return out


def load_layer(r: CheckpointReader, cfg: ModelConfig, layer: int, dtype) -> LayerWeights:
    spec = FAMILY_SPECS[cfg.model_type]
    p = f"model.layers.{layer}."
    tensors = _load_attention(r, cfg, p, dtype)
    if cfg.is_moe_layer(layer):
        tensors.update(_load_experts(r, cfg, spec, p, dtype))
    else:
        tensors["dense_gate_up"], tensors["dense_down"] = _load_swiglu(
            r, p + "mlp.", ("gate_proj", "up_proj", "down_proj"), cfg.hidden_size,
            cfg.dense_intermediate_size, dtype)
    return LayerWeights(**{k: v.contiguous() for k, v in tensors.items()})


def load_weights(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                 cfg: ModelConfig | None = None) -> tuple[ModelConfig, ModelWeights]:
    """Read config.json and every weight of a supported MoE checkpoint folder."""
    model_dir = Path(model_dir)
    cfg = cfg or load_config(model_dir)
    r = CheckpointReader(model_dir)
    v, h = cfg.vocab_size, cfg.hidden_size
    embed = r.get("model.embed_tokens.weight", (v, h), dtype)
    if cfg.tie_word_embeddings and not r.has("lm_head.weight"):
        lm_head = embed
    else:
        lm_head = r.get("lm_head.weight", (v, h), dtype)
    weights = ModelWeights(embed=embed, final_norm=r.get("model.norm.weight", (h,), dtype),
                           lm_head=lm_head,
                           layers=[load_layer(r, cfg, i, dtype) for i in range(cfg.num_layers)])
    return cfg, weights
