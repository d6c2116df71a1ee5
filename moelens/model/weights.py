"""Weight containers: plain dataclasses of tensors, experts stacked as [E, ...].

Legend: H hidden, Q = heads*head_dim, KV = kv_heads*head_dim, E experts, I expert intermediate,
Is shared-expert intermediate, Id dense-MLP intermediate, V vocab.

On the expert service's CPU device the GEMM weights (projections, experts, lm_head) may be
moelens.panel_gemm.PanelWeight instead of tensors: the same [.., N, K] weight, packed once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

# LayerWeights fields that are GEMM weights [.., N, K] (what the CPU device packs into panels).
GEMM_FIELDS = frozenset({"qkv_proj", "o_proj", "experts_gate_up", "experts_down",
                         "shared_gate_up", "shared_down", "dense_gate_up", "dense_down"})
# The SwiGLU gate/up weights among them (packed "gated": see moelens.panel_gemm).
GATED_FIELDS = frozenset({"experts_gate_up", "shared_gate_up", "dense_gate_up"})


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_attention_norm: torch.Tensor  # [H]
    qkv_proj: torch.Tensor  # [Q + 2*KV, H] (q, k, v rows fused)
    o_proj: torch.Tensor  # [H, Q]
    qkv_bias: torch.Tensor | None = None  # [Q + 2*KV]
    q_norm: torch.Tensor | None = None  # [D] per-head or [Q] full
    k_norm: torch.Tensor | None = None  # [D] per-head or [KV] full
    router: torch.Tensor | None = None  # [E, H]
    experts_gate_up: torch.Tensor | None = None  # [E, 2*I, H] (gate rows then up rows)
    experts_down: torch.Tensor | None = None  # [E, H, I]
    shared_gate_up: torch.Tensor | None = None  # [2*Is, H]
    shared_down: torch.Tensor | None = None  # [H, Is]
    shared_expert_gate: torch.Tensor | None = None  # [1, H]
    dense_gate_up: torch.Tensor | None = None  # [2*Id, H]
    dense_down: torch.Tensor | None = None  # [H, Id]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The present tensors by field name (the order is stable: used to pack and stream)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def replace_tensors(self, tensors: dict[str, torch.Tensor]) -> "LayerWeights":
        """A LayerWeights whose tensors are `tensors` (e.g. views into a device buffer)."""
        return LayerWeights(**tensors)


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)
    layers: list[LayerWeights] = field(default_factory=list)

    def num_bytes(self) -> int:
        head = 0 if self.lm_head.data_ptr() == self.embed.data_ptr() else self.lm_head.numel()
        return ((self.embed.numel() + self.final_norm.numel() + head) * self.embed.element_size()
                + sum(layer.num_bytes() for layer in self.layers))
