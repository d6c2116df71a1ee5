"""Architectures of the synthetic checkpoints `moe-lens make-model` can write.

Each preset is a Hugging Face config built with transformers' own config classes, so the
written `config.json` is exactly what a public checkpoint of that family carries. The tiny
presets exist for tests and demos; `bench-mixtral` is the reference benchmark model of
/work/shared/docs/peers.md and must not drift from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers import (MixtralConfig, OlmoeConfig, PretrainedConfig, Qwen2MoeConfig,
                          Qwen3MoeConfig)

from moelens.tokenizer import BOS_ID, EOS_ID

PEAKY_INIT_STD = 0.15
"""Weight std of the test models: at the usual 0.02 a random model's logits are so flat that
greedy decoding collapses into one repeated token, which makes greedy output a useless check."""
TINY_INIT_STD = 0.2
"""The 64-wide presets need more: with q/k norms (Qwen3, OLMoE) at 0.15 greedy text still
falls into short loops for some prompts."""

# Ids of the built-in tokenizer, written into every preset's config and generation_config.
_SPECIAL_IDS = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None)


@dataclass(frozen=True)
class Preset:
    """A named synthetic checkpoint recipe."""

    name: str
    description: str
    make_config: Callable[[int], PretrainedConfig]
    """Tokenizer vocabulary size -> the model config; its `initializer_range` is the std of the
    normal init of every matrix, embedding and bias (norm weights are 1)."""


def _default(vocab_size: int) -> PretrainedConfig:
    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=4096,
        tie_word_embeddings=False, initializer_range=PEAKY_INIT_STD, dtype="float32",
        **_SPECIAL_IDS)


def _bench_mixtral(vocab_size: int) -> PretrainedConfig:
    # The model's vocabulary is fixed at 32000 whatever the tokenizer's size: the benchmark
    # feeds random ids, and ids past the tokenizer's vocabulary decode to nothing.
    del vocab_size
    return MixtralConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
        num_experts_per_tok=2, rope_theta=1e6, tie_word_embeddings=False, dtype="float32")


def _tiny_mixtral(vocab_size: int) -> PretrainedConfig:
    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=2048,
        tie_word_embeddings=False, initializer_range=TINY_INIT_STD, dtype="float32",
        **_SPECIAL_IDS)


def _tiny_qwen2_moe(vocab_size: int) -> PretrainedConfig:
    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
        rope_theta=1e6, max_position_embeddings=2048, tie_word_embeddings=False,
        initializer_range=TINY_INIT_STD, dtype="float32", **_SPECIAL_IDS)


def _tiny_qwen3_moe(vocab_size: int) -> PretrainedConfig:
    # head_dim * heads != hidden_size, as in the real Qwen3-MoE checkpoints.
    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=64, head_dim=32, intermediate_size=128,
        moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
        rope_theta=1e6, max_position_embeddings=2048, tie_word_embeddings=False,
        initializer_range=TINY_INIT_STD, dtype="float32", **_SPECIAL_IDS)


def _tiny_olmoe(vocab_size: int) -> PretrainedConfig:
    return OlmoeConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, rope_theta=1e4, max_position_embeddings=2048,
        tie_word_embeddings=False, initializer_range=TINY_INIT_STD, dtype="float32",
        **_SPECIAL_IDS)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("default", "built-in Mixtral-architecture model (20 M params, 80 MB)", _default),
    Preset("bench-mixtral", "benchmark Mixtral of docs/peers.md (489 M params, 1.96 GB)",
           _bench_mixtral),
    Preset("tiny-mixtral", "2-layer Mixtral for tests", _tiny_mixtral),
    Preset("tiny-qwen2-moe", "2-layer Qwen2-MoE with a shared expert and qkv biases",
           _tiny_qwen2_moe),
    Preset("tiny-qwen3-moe", "2-layer Qwen3-MoE with per-head q/k norms", _tiny_qwen3_moe),
    Preset("tiny-olmoe", "2-layer OLMoE with q/k norms over the whole projection", _tiny_olmoe),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
