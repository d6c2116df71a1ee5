"""Inputs of the performance model: what the model is, what the job is, how it is deployed.

Small frozen dataclasses; every constructor validates and raises ValueError naming the field and
what to set instead. The equations live in perf_model.py (Stage 1, token budget) and
perf_model_stage2.py (finite jobs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from moelens.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "float8": 1, "fp8": 1, "int8": 1}


def dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {name!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class ModelSpec:
    """The sizes of a MoE decoder that the model needs (bytes and FLOPs, per layer)."""

    num_layers: int
    hidden_size: int
    num_experts: int
    top_k: int
    gqa_group_size: int
    q_size: int
    """num_heads · head_dim."""
    kv_size: int
    """num_kv_heads · head_dim."""
    vocab_size: int
    expert_intermediate_size: int
    weight_bytes_per_param: int
    activation_bytes: int
    """Bytes per activation element crossing between services."""
    kv_bytes_per_token: int
    """K and V of one token across all layers."""
    layer_attention_bytes: tuple[int, ...]
    """Per layer: QKV/O projections and norms."""
    layer_mlp_bytes: tuple[int, ...]
    """Per layer: all experts + router (+ shared expert), or the dense MLP."""
    fixed_bytes: int
    """Embeddings, final norm and lm_head (unless tied): always resident on the device, as the
    expert service keeps them."""
    layer_flops_per_token: tuple[float, ...]
    """Per layer GEMM FLOPs of one token: QKV/O, router, top-k experts (+ shared expert)."""
    head_flops_per_row: float
    """lm_head FLOPs per row that emits a token."""

    def __post_init__(self) -> None:
        if len(self.layer_attention_bytes) != self.num_layers or \
                len(self.layer_mlp_bytes) != self.num_layers or \
                len(self.layer_flops_per_token) != self.num_layers:
            raise ValueError("ModelSpec: per-layer tuples must have num_layers entries")

    @classmethod
    def from_config(cls, cfg: ModelConfig, weight_bytes: int = 2, kv_bytes: int | None = None,
                    activation_bytes: int | None = None) -> "ModelSpec":
        """Sizes of `cfg` with `weight_bytes` per parameter (KV/activations alike unless given)."""
        kv_bytes = weight_bytes if kv_bytes is None else kv_bytes
        activation_bytes = weight_bytes if activation_bytes is None else activation_bytes
        h = cfg.hidden_size
        attn_params = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 2 * h
        attn_flops = 2.0 * (h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h)
        mlp_bytes, flops = [], []
        for layer, total in enumerate(cfg.layer_parameter_counts()):
            mlp_bytes.append((total - attn_params) * weight_bytes)
            if cfg.is_moe_layer(layer):
                mlp_flops = 2.0 * (cfg.top_k * 3 * h * cfg.expert_intermediate_size
                                   + h * cfg.num_experts
                                   + 3 * h * cfg.shared_expert_intermediate_size)
            else:
                mlp_flops = 2.0 * 3 * h * cfg.dense_intermediate_size
            flops.append(attn_flops + mlp_flops)
        return cls(
            num_layers=cfg.num_layers, hidden_size=h, num_experts=cfg.num_experts,
            top_k=cfg.top_k, gqa_group_size=cfg.gqa_group_size, q_size=cfg.q_size,
            kv_size=cfg.kv_size, vocab_size=cfg.vocab_size,
            expert_intermediate_size=cfg.expert_intermediate_size,
            weight_bytes_per_param=weight_bytes, activation_bytes=activation_bytes,
            kv_bytes_per_token=cfg.kv_bytes_per_token(kv_bytes),
            layer_attention_bytes=(attn_params * weight_bytes,) * cfg.num_layers,
            layer_mlp_bytes=tuple(mlp_bytes),
            fixed_bytes=cfg.embedding_parameters() * weight_bytes,
            layer_flops_per_token=tuple(flops),
            head_flops_per_row=2.0 * h * cfg.vocab_size)

    def layer_weight_bytes(self, layer: int) -> int:
        return self.layer_attention_bytes[layer] + self.layer_mlp_bytes[layer]

    @property
    def layers_weight_bytes(self) -> int:
        """All decoder layers: what is streamed when nothing is resident."""
        return sum(map(self.layer_weight_bytes, range(self.num_layers)))

    @property
    def total_weight_bytes(self) -> int:
        return self.layers_weight_bytes + self.fixed_bytes

    @property
    def exchange_bytes_per_decode_token(self) -> int:
        """Bytes crossing expert_gpu ↔ attention_cpu per decode token per layer (q, k, v; o)."""
        return (2 * self.q_size + 2 * self.kv_size) * self.activation_bytes

    def workspace_bytes(self, max_num_tokens: int) -> int:
        """Device activations of the largest step, as the expert service reserves them: hidden
        states, q/k/v/attention and the routed expert rows."""
        per_token = (6 * self.hidden_size + 3 * (self.q_size + 2 * self.kv_size)
                     + 3 * self.top_k * self.expert_intermediate_size)
        return max_num_tokens * per_token * self.activation_bytes


@dataclass(frozen=True)
class Workload:
    """A batch job: `num_requests` requests of `prompt_len` + `gen_len` tokens, or explicit pairs.

    With `pairs` (one (prompt_len, gen_len) per request), prompt_len/gen_len are their means
    (informational) and num_requests must equal len(pairs); build it with `from_pairs`.
    """

    prompt_len: int
    gen_len: int
    num_requests: int
    pairs: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len", "num_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"workload {name} must be >= 1, got {getattr(self, name)}")
        if self.pairs and len(self.pairs) != self.num_requests:
            raise ValueError(f"workload num_requests ({self.num_requests}) must equal the number "
                             f"of (prompt_len, gen_len) pairs ({len(self.pairs)})")
        for p, g in self.pairs:
            if p < 1 or g < 1:
                raise ValueError(f"workload pair ({p}, {g}): prompt_len and gen_len must be >= 1")

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, int]]) -> "Workload":
        if not pairs:
            raise ValueError("workload pairs is empty; give at least one (prompt_len, gen_len)")
        pairs_t = tuple((int(p), int(g)) for p, g in pairs)
        k = len(pairs_t)
        return cls(prompt_len=max(1, round(sum(p for p, _ in pairs_t) / k)),
                   gen_len=max(1, round(sum(g for _, g in pairs_t) / k)),
                   num_requests=k, pairs=pairs_t)

    def classes(self) -> list[tuple[int, int, int]]:
        """Distinct (prompt_len, gen_len, count) of the job."""
        if not self.pairs:
            return [(self.prompt_len, self.gen_len, self.num_requests)]
        return [(p, g, n) for (p, g), n in sorted(Counter(self.pairs).items())]


@dataclass(frozen=True)
class Deployment:
    """Memory given to the serving system."""

    kv_cache_bytes: int
    """Host memory for the paged KV cache (all layers, K and V)."""
    block_size: int = 16
    """KV block size in tokens (b)."""
    device_memory_bytes: int | None = None
    """Accelerator memory budget for weights + double buffer + workspace (the expert service's
    --device-memory-gb). None: every layer resident, nothing streamed."""
    max_num_tokens: int = 8192
    """Most tokens one step computes (the services' --max-num-tokens): sizes the workspace and
    caps the token budget."""
    token_budget: int | None = None
    """The scheduler's budget when it is already fixed (a --token-budget flag, or the one the
    coordinator chose at start from its warmup profile); None: the model's n_real."""
    max_num_seqs: int | None = None
    """The scheduler's cap on running requests (--max-num-seqs); None: no cap."""

    def __post_init__(self) -> None:
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.device_memory_bytes is not None and self.device_memory_bytes <= 0:
            raise ValueError(f"device_memory_bytes must be > 0 or None, got "
                             f"{self.device_memory_bytes}")
        if self.max_num_tokens < 1:
            raise ValueError(f"max_num_tokens must be >= 1, got {self.max_num_tokens}")
        for name in ("token_budget", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")

    def kv_capacity_tokens(self, spec: ModelSpec) -> int:
        """M: whole blocks of KV that fit in kv_cache_bytes, in tokens."""
        per_block = spec.kv_bytes_per_token * self.block_size
        return (self.kv_cache_bytes // per_block) * self.block_size


@dataclass(frozen=True)
class StepOverheads:
    """Per-iteration costs of the serving system that a kernel profile does not see.

    The hardware profile times kernels (GEMM line, attention, copies, one exchange); a real
    iteration also runs the coordinator's Python (schedule, plan, token events), the Step RPC,
    embedding and sampling, and the expert-side causal attention of fresh prompts. These are
    measured on the running system (`moe-lens bench validate` does it before its points, from a
    calibration job's phase timings and a timing of the prefill-attention call); all zero
    leaves the model as the kernels alone.
    """

    step_fixed_s: float = 0.0
    """Seconds per iteration outside the profiled phases, whatever its size."""
    step_s_per_seq: float = 0.0
    """Seconds per scheduled sequence outside the profiled phases (plan entries, sampling,
    token events)."""
    step_s_per_token: float = 0.0
    """Seconds per token of the iteration outside the profiled phases (its id, position and
    slot through the plan, the Step RPC and the attention plan: Python lists)."""
    request_s: float = 0.0
    """Seconds per request outside the profiled phases, priced in the iteration that admits it:
    its admission and first plan entry (prompt, sampling parameters), its completion (the
    final-only publish, freeing its blocks)."""
    prefill_attention_s_per_seq: float = 0.0
    """Expert-side causal attention: seconds per fresh sequence per layer (the call itself)."""
    prefill_attention_s_per_token: float = 0.0
    """Expert-side causal attention: seconds per fresh token per layer (copies of q, k, v)."""
    prefill_attention_s_per_flop: float | None = None
    """Expert-side causal attention: seconds per FLOP (2·q_size·l² per fresh sequence of l
    tokens per layer); None prices it at the GEMM line's rate."""
    gemm_layer_s: float = 0.0
    """GEMM seconds per layer per iteration that a running job adds to the profile's curve,
    whatever the iteration's size: the warmup times the layers with the other services idle;
    in a job the compute threads wake after the exchange and the attention service has run on
    the same cores and caches in between (session 17: priced as a scale on the line's fixed
    part instead, it grew with the curve's bend and priced decode steps of 16-24 tokens ~10%
    slow when fitted at 1 and 24)."""
    gemm_scale: float = 1.0
    """GEMM time inside a running job / the profile's, for the curve itself (all its parts and
    the lm_head rows)."""
    exchange_fixed_scale: float = 1.0
    """Activation exchange inside a running job / the profile's (its warmup round trip: both
    processes spinning, nothing else running), for the round trip's fixed part."""
    exchange_byte_scale: float = 1.0
    """The same for the part that grows with the bytes crossing (one scale for both priced the
    exchange of decode-heavy jobs 10–25% low and of prefill-heavy ones 25–35% high)."""
    attention_s_per_layer: float = 0.0
    """Paged-attention seconds per layer per iteration beyond its KV bytes (the call's plan,
    the wake-up), whatever the context."""
    attention_s_per_row: float = 0.0
    """Paged-attention seconds per query row per layer beyond its KV bytes (the row's item)."""
    attention_s_per_token: float = 0.0
    """Paged-attention seconds per token of the iteration per layer: storing its K and V."""

    def __post_init__(self) -> None:
        for name in ("gemm_scale", "exchange_fixed_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"StepOverheads.{name} must be > 0, got {getattr(self, name)}")
        for name in ("gemm_layer_s", "exchange_byte_scale", "step_fixed_s", "step_s_per_seq",
                     "step_s_per_token", "request_s", "prefill_attention_s_per_seq",
                     "prefill_attention_s_per_token", "prefill_attention_s_per_flop",
                     "attention_s_per_layer", "attention_s_per_row", "attention_s_per_token"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"StepOverheads.{name} must be >= 0, got {value}")
