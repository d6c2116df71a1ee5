"""Model configuration: one validated dataclass built from a Hugging Face `config.json`.

Every family-specific quirk is decided here, once, so that model code reads plain flags:
`qk_norm` says where q/k RMSNorm applies, `renormalize_topk` says whether router weights are
renormalised after top-k, `dense_layers` lists layers whose MLP is a dense SwiGLU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QK_NORM_NONE = "none"
QK_NORM_PER_HEAD = "per_head"  # Qwen3-MoE: RMSNorm over head_dim, weight [head_dim]
QK_NORM_FULL = "full"  # OLMoE: RMSNorm over the whole projection, weight [heads*head_dim]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a MoE decoder, normalised across families."""

    model_type: str
    """Hugging Face `model_type` (mixtral, qwen2_moe, qwen3_moe, olmoe)."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA when fewer than num_heads)."""
    head_dim: int
    num_experts: int
    top_k: int
    """Experts chosen per token."""
    expert_intermediate_size: int
    renormalize_topk: bool
    """Divide the top-k router probabilities by their sum."""
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: str = QK_NORM_NONE
    clip_qkv: float | None = None
    """OLMoE: clamp q, k, v to [-clip_qkv, clip_qkv] after projection."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE shared expert (0 = none); its output is scaled by sigmoid(shared_expert_gate)."""
    dense_layers: tuple[int, ...] = ()
    """Layers whose MLP is dense (Qwen `mlp_only_layers` / `decoder_sparse_step`)."""
    dense_intermediate_size: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "num_experts", "top_k", "expert_intermediate_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise ValueError(f"config.json: num_experts_per_tok ({self.top_k}) exceeds the "
                             f"number of experts ({self.num_experts})")
        if self.qk_norm not in (QK_NORM_NONE, QK_NORM_PER_HEAD, QK_NORM_FULL):
            raise ValueError(f"qk_norm must be none, per_head or full, got {self.qk_norm!r}")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def gqa_group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def num_parameters(self) -> int:
        """Parameter count (all experts)."""
        return sum(self.layer_parameter_counts()) + self.embedding_parameters()

    def embedding_parameters(self) -> int:
        tables = 1 if self.tie_word_embeddings else 2
        return tables * self.vocab_size * self.hidden_size + self.hidden_size

    def layer_parameter_counts(self) -> list[int]:
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 2 * h
        counts = []
        for layer in range(self.num_layers):
            if self.is_moe_layer(layer):
                mlp = self.num_experts * 3 * h * self.expert_intermediate_size + self.num_experts * h
                mlp += 3 * h * self.shared_expert_intermediate_size
                mlp += h if self.shared_expert_intermediate_size else 0
            else:
                mlp = 3 * h * self.dense_intermediate_size
            counts.append(attn + mlp)
        return counts


# Family parsers ------------------------------------------------------------------------------

def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json: neither rope_parameters.rope_theta nor rope_theta is set")
    return float(theta)


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _max_context(raw: dict[str, Any]) -> int:
    """Longest context served exactly: a sliding window caps it (we never evict inside a window)."""
    max_pos = int(raw.get("max_position_embeddings", 4096))
    window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
    return min(max_pos, int(window)) if window else max_pos


def _common(raw: dict[str, Any]) -> dict[str, Any]:
    heads = raw["num_attention_heads"]
    return dict(
        model_type=raw["model_type"],
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rope_theta=_rope_theta(raw),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=_max_context(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
        extra=raw,
    )


def _num_experts(raw: dict[str, Any]) -> int:
    """Qwen/OLMoE call it num_experts; some transformers-5 configs write num_local_experts."""
    value = raw.get("num_experts", raw.get("num_local_experts"))
    if value is None:
        raise KeyError("num_experts")
    return int(value)


def _dense_layers(raw: dict[str, Any]) -> tuple[int, ...]:
    only = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step", 1) or 1)
    return tuple(i for i in range(raw["num_hidden_layers"]) if i in only or (i + 1) % step)


def _parse_mixtral(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**_common(raw), num_experts=raw["num_local_experts"],
                       top_k=raw["num_experts_per_tok"],
                       expert_intermediate_size=raw["intermediate_size"], renormalize_topk=True)


def _parse_qwen2_moe(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**_common(raw), num_experts=_num_experts(raw),
                       top_k=raw["num_experts_per_tok"],
                       expert_intermediate_size=raw["moe_intermediate_size"],
                       renormalize_topk=bool(raw.get("norm_topk_prob", False)),
                       qkv_bias=bool(raw.get("qkv_bias", True)),
                       shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size", 0)),
                       dense_layers=_dense_layers(raw),
                       dense_intermediate_size=int(raw.get("intermediate_size", 0)))


def _parse_qwen3_moe(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**_common(raw), num_experts=_num_experts(raw),
                       top_k=raw["num_experts_per_tok"],
                       expert_intermediate_size=raw["moe_intermediate_size"],
                       renormalize_topk=bool(raw.get("norm_topk_prob", False)),
                       qkv_bias=bool(raw.get("attention_bias", False)),
                       qk_norm=QK_NORM_PER_HEAD,
                       dense_layers=_dense_layers(raw),
                       dense_intermediate_size=int(raw.get("intermediate_size", 0)))


def _parse_olmoe(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**_common(raw), num_experts=_num_experts(raw),
                       top_k=raw["num_experts_per_tok"],
                       expert_intermediate_size=raw["intermediate_size"],
                       renormalize_topk=bool(raw.get("norm_topk_prob", False)),
                       qkv_bias=bool(raw.get("attention_bias", False)),
                       qk_norm=QK_NORM_FULL, clip_qkv=raw.get("clip_qkv"))


CONFIG_PARSERS = {
    "mixtral": _parse_mixtral,
    "qwen2_moe": _parse_qwen2_moe,
    "qwen3_moe": _parse_qwen3_moe,
    "olmoe": _parse_olmoe,
}


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the dict of a `config.json`."""
    model_type = raw.get("model_type")
    if model_type not in CONFIG_PARSERS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(CONFIG_PARSERS))}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (silu only)")
    try:
        return CONFIG_PARSERS[model_type](raw)
    except KeyError as missing:
        raise ValueError(f"config.json ({model_type}): missing field {missing}") from None


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    with open(path) as f:
        return parse_config(json.load(f))
