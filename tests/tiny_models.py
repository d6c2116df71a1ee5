"""Tiny random-weight checkpoints of every supported family, built with transformers' own config
classes and `save_pretrained` (the reference implementation writes the files we read)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.15, max_position_embeddings=512,
              tie_word_embeddings=False)

FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        rope_theta=1e4),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=80, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=80, moe_intermediate_size=32, num_experts=6,
        num_experts_per_tok=3, norm_topk_prob=True, head_dim=24),
    "olmoe": lambda: transformers.OlmoeConfig(
        **{**COMMON, "initializer_range": 0.25}, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, clip_qkv=3.0),
}


def build_tiny(family: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny checkpoint of `family` (config fields overridden by `overrides`)."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    if overrides:  # rebuild so derived fields (e.g. layer_types) follow the new values
        fields = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
        config = type(config)(**{**fields, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return out_dir


def load_reference(model_dir: Path):
    """HF transformers model in fp32 with the eager (loop-over-experts) expert implementation."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, experts_implementation="eager")
    return model.eval()


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation by HF transformers, EOS not special (the ignore_eos semantics)."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        result = model(ids, use_cache=True)
        for _ in range(num_tokens):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            result = model(torch.tensor([[token]]), past_key_values=result.past_key_values,
                           use_cache=True)
    return out
