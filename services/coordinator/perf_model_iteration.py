"""Cost of one iteration (a forward pass over all layers) and where the weights live.

Both stages of the model price an iteration the same way, from a HardwareProfile:

    io        = streamed weight bytes / B_IO                       (the data mover)
    gemm      = L · g_l + s · [r(n) · Σ_l (a_l + b_l · n) + rows_out · lm_head FLOPs / C]
                (GEMM line per layer, r(n) its measured curve's bend; g_l, s =
                StepOverheads.gemm_layer_s, gemm_scale: 0 and 1 unless measured in situ)
    prefill   = L · Σ_fresh (c_seq + c_tok · l + 2·q_size·l²·c_flop) (expert-side causal attention)
    attention = KV bytes read / attention KV bandwidth + L · (a_fix + a_row · paged rows
                + a_tok · n)   (CPU paged attention: decode rows and prompt chunks that
                continue a cached prefix; per call, per row and per stored token, 0 unless
                measured in situ)
    exchange  = L · (max(0, x_a · fixed − hidden) + x_b · per-byte · (n · 2·kv_size
                + paged rows · 2·q_size) · act. bytes)   (x_a, x_b =
                StepOverheads.exchange_fixed_scale, exchange_byte_scale, 1 unless measured in
                situ; on an accelerator host the round trip's latency runs while the expert
                computes the layer's causal attention of fresh prompts, hidden = prefill / L;
                on a CPU-only host that attention waits for the round trip, hidden = 0)
    overhead  = step fixed + per sequence · sequences + per token · n
                + per request · fresh sequences                      (StepOverheads)
    compute   = max(gemm + prefill, attention) + exchange + overhead  (accelerator host)
              = gemm + prefill + attention + exchange + overhead      (CPU-only host: one set of
                                                                       cores runs it all)
    host_mem  = (streamed bytes · c + [CPU-only: all layer weights] + KV bytes read) / B_host
    total     = max(io, compute, host_mem)

host_mem is the contention term the paper did not model: weight streaming and CPU attention both
read host memory; each is capped at its own rate, and together at the socket's bandwidth, so the
iteration cannot end before all their bytes have crossed the socket (the minimum makespan of two
rate-capped flows sharing one pipe is max(D1/r1, D2/r2, (D1+D2)/B)). c = 1 for DMA to an
accelerator, 2 on a CPU-only host where the copy reads and writes host memory.
The GEMM line is rescaled from the profiled layer to each layer of the model: slope by FLOPs per
token, intercept by weight bytes (the fixed part is mostly reading the weights once). A straight
line fitted at tens of tokens and more overstates an iteration of a few: one decode row touches
k of E experts' weights, and small GEMMs run other kernels. Where the profile carries the
layer's measured curve (the expert service times 1 … 1024 tokens), r(n) = curve(n) / line(n) on
the profiled layer, interpolated linearly in n and held at its end values beyond the curve,
scales the whole iteration's line. Without a curve, r(n) = 1 and the experts' share of the
intercept scales with the expected fraction of experts picked, 1 − (1 − k/E)^n.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from moelens.profile import HardwareProfile
from services.coordinator.perf_model_types import Deployment, ModelSpec, StepOverheads

BOTTLENECKS = ("io", "gemm", "cpu_attention", "kv_capacity", "host_memory_bandwidth")


@dataclass(frozen=True)
class Placement:
    """Which layers stay on the device and which are streamed every iteration."""

    num_resident_layers: int
    """The leading layers are resident (the expert service's order); the rest stream."""
    resident_bytes: int
    """Resident layers + embeddings/final norm/lm_head."""
    streamed_bytes: int
    double_buffer_bytes: int
    workspace_bytes: int


def place_weights(spec: ModelSpec, deployment: Deployment) -> Placement:
    """Mirror the expert service's residency plan under deployment.device_memory_bytes.

    Embeddings/lm_head and the workspace always stay; if all layers fit they are resident,
    otherwise a double buffer of the largest layer is reserved and leading layers are kept
    until the next one does not fit. A budget below fixed + workspace + double buffer cannot run
    and raises ValueError with that minimum.
    """
    sizes = [spec.layer_weight_bytes(i) for i in range(spec.num_layers)]
    workspace = spec.workspace_bytes(deployment.max_num_tokens)
    budget = deployment.device_memory_bytes
    available = None if budget is None else budget - spec.fixed_bytes - workspace
    if available is None or available >= sum(sizes):
        return Placement(spec.num_layers, spec.total_weight_bytes, 0, 0, workspace)
    double_buffer = 2 * max(sizes)
    minimum = spec.fixed_bytes + workspace + double_buffer
    if budget < minimum:
        gib = 2 ** 30
        raise ValueError(
            f"device memory {budget / gib:.3f} GiB cannot hold the double buffer: set it to at "
            f"least {minimum / gib:.3f} GiB (embeddings/lm_head {spec.fixed_bytes / gib:.3f}, "
            f"workspace {workspace / gib:.3f} for max_num_tokens={deployment.max_num_tokens}, "
            f"2 x layer {max(sizes) / gib:.3f}), or lower max_num_tokens")
    resident, used = 0, double_buffer
    for size in sizes:
        if used + size > available:
            break
        resident, used = resident + 1, used + size
    resident_layer_bytes = sum(sizes[:resident])
    return Placement(resident, spec.fixed_bytes + resident_layer_bytes,
                     spec.layers_weight_bytes - resident_layer_bytes, double_buffer, workspace)


@dataclass(frozen=True)
class GemmLine:
    """The GEMM time of a whole iteration at n tokens (see `seconds_at`), + lm_head rows."""

    intercept_s: float
    slope_s_per_token: float
    s_per_output_row: float
    expert_intercept_s: float = 0.0
    """The part of intercept_s that reads expert weights (scales with the experts picked)."""
    expert_pick_fraction: float = 1.0
    """k/E: the chance one token picks a given expert."""
    curve_tokens: tuple[int, ...] = ()
    curve_ratio: tuple[float, ...] = ()
    """Measured / fitted-line seconds of the profiled layer at each of curve_tokens."""

    def seconds_at(self, num_tokens: float) -> float:
        """GEMM seconds of an iteration of `num_tokens` tokens, lm_head rows not included: the
        line bent by the curve, or with only the experts some token picks read."""
        if num_tokens <= 0:
            return 0.0
        line = self.intercept_s + self.slope_s_per_token * num_tokens
        if self.curve_tokens:
            return line * self._ratio(num_tokens)
        picked = 1.0 - (1.0 - self.expert_pick_fraction) ** num_tokens
        return line - self.expert_intercept_s * (1.0 - picked)

    def _ratio(self, n: float) -> float:
        """curve_ratio interpolated linearly in n, held at the end values outside the curve."""
        xs, ys = self.curve_tokens, self.curve_ratio
        i = bisect.bisect_left(xs, n)
        if i == 0:
            return ys[0]
        if i == len(xs):
            return ys[-1]
        w = (n - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + w * (ys[i] - ys[i - 1])


def gemm_line(spec: ModelSpec, profile: HardwareProfile) -> GemmLine:
    a, b = profile.gemm_intercept_s, profile.gemm_slope_s_per_token
    per_byte = a / profile.gemm_layer_weight_bytes
    intercept = sum(per_byte * spec.layer_weight_bytes(i) for i in range(spec.num_layers))
    slope = sum(b * f / profile.gemm_layer_flops_per_token for f in spec.layer_flops_per_token)
    is_moe = spec.num_experts > spec.top_k >= 1
    ratio = tuple(t / (a + b * n) for n, t in zip(profile.gemm_curve_tokens, profile.gemm_curve_s))
    return GemmLine(intercept, slope, spec.head_flops_per_row / profile.gemm_flops_per_s,
                    expert_intercept_s=per_byte * sum(spec.layer_mlp_bytes) if is_moe else 0.0,
                    expert_pick_fraction=spec.top_k / spec.num_experts if is_moe else 1.0,
                    curve_tokens=profile.gemm_curve_tokens, curve_ratio=ratio)


@dataclass(frozen=True)
class IterationCost:
    """Seconds of each resource in one iteration, and the total."""

    io_s: float
    gemm_s: float
    attention_s: float
    exchange_s: float
    host_memory_s: float
    compute_s: float
    """GEMM, attention, exchange and overheads combined (overlapped or added, per the host)."""
    total_s: float
    dominant: str
    """What sets total_s: io, gemm, cpu_attention (incl. exchange) or host_memory_bandwidth."""
    host_memory_bytes: float
    """Host memory traffic of the iteration (weights streamed + KV read [+ CPU GEMM reads])."""
    prefill_attention_s: float = 0.0
    overhead_s: float = 0.0


@dataclass(frozen=True)
class StepLoad:
    """What the scheduler put into one iteration, beyond its token count."""

    num_paged_rows: float
    """Query rows the paged (CPU) attention serves: decode rows and rows of prompt chunks that
    continue a cached prefix."""
    fresh_sq_tokens: float = 0.0
    """Σ l² over fresh sequences (no cached prefix) of l tokens: their causal attention."""
    num_fresh_seqs: float = 0.0
    num_fresh_tokens: float = 0.0
    num_seqs: float = 0.0


def iteration_cost(spec: ModelSpec, profile: HardwareProfile, placement: Placement,
                   num_tokens: float, num_decode: float, kv_read_tokens: float,
                   num_output_rows: float, line: GemmLine | None = None,
                   load: StepLoad | None = None,
                   overheads: StepOverheads | None = None) -> IterationCost:
    """Price one iteration of `num_tokens` tokens (see the module docstring for the equations).

    `line` may be passed precomputed (gemm_line(spec, profile)) when pricing many iterations.
    Without `load`, the decode rows are the paged rows and nothing is a fresh prompt.
    """
    line = gemm_line(spec, profile) if line is None else line
    load = StepLoad(num_paged_rows=num_decode) if load is None else load
    over = StepOverheads() if overheads is None else overheads
    io = placement.streamed_bytes / profile.io_bandwidth_bytes_per_s
    gemm = 0.0
    if num_tokens > 0:
        gemm = spec.num_layers * over.gemm_layer_s + over.gemm_scale * (
            line.seconds_at(num_tokens) + line.s_per_output_row * num_output_rows)
    s_per_flop = over.prefill_attention_s_per_flop
    if s_per_flop is None:
        s_per_flop = 1.0 / profile.gemm_flops_per_s
    prefill = spec.num_layers * (over.prefill_attention_s_per_seq * load.num_fresh_seqs
                                 + over.prefill_attention_s_per_token * load.num_fresh_tokens
                                 + 2.0 * spec.q_size * load.fresh_sq_tokens * s_per_flop)
    kv_bytes = kv_read_tokens * spec.kv_bytes_per_token
    attention = kv_bytes / profile.attention_kv_bytes_per_s
    exchange = 0.0
    if num_tokens > 0:
        moved = (num_tokens * 2 * spec.kv_size + load.num_paged_rows * 2 * spec.q_size) \
            * spec.activation_bytes
        latency = over.exchange_fixed_scale * profile.exchange_fixed_s
        hidden = prefill / spec.num_layers if profile.is_accelerator_separate else 0.0
        exchange = spec.num_layers * (
            max(0.0, latency - hidden)
            + over.exchange_byte_scale * profile.exchange_s_per_byte * moved)
        attention += spec.num_layers * (over.attention_s_per_layer
                                        + over.attention_s_per_row * load.num_paged_rows
                                        + over.attention_s_per_token * num_tokens)
    overhead = 0.0
    if num_tokens > 0:
        overhead = over.step_fixed_s + over.step_s_per_seq * load.num_seqs \
            + over.step_s_per_token * num_tokens + over.request_s * load.num_fresh_seqs
    if profile.is_accelerator_separate:
        compute = max(gemm + prefill, attention) + exchange + overhead
        traffic = placement.streamed_bytes + kv_bytes
    else:
        compute = gemm + prefill + attention + exchange + overhead
        traffic = 2 * placement.streamed_bytes + spec.layers_weight_bytes + kv_bytes
    host_mem = traffic / profile.host_memory_bandwidth_bytes_per_s
    total = max(io, compute, host_mem)
    compute_name = "gemm" if gemm + prefill >= attention + exchange else "cpu_attention"
    # On (near) ties prefer the accelerator, then IO: the named resource is the one to buy more of.
    ranked = [(compute, compute_name), (io, "io"), (host_mem, "host_memory_bandwidth")]
    dominant = next(name for value, name in ranked if value >= total * (1 - 1e-9))
    return IterationCost(io, gemm, attention, exchange, host_mem, compute, total, dominant,
                         traffic, prefill, overhead)


def classify_bottleneck(cost: IterationCost, is_kv_limited: bool) -> str:
    """The resource that bounds throughput.

    KV capacity bounds it when the iteration is not full (fewer tokens than the budget) and the
    time is set by something more tokens would not lengthen (the weight stream, or the GEMMs'
    fixed part); attention and host-memory time grow with the KV itself, so they keep their name.
    """
    if cost.dominant in ("cpu_attention", "host_memory_bandwidth"):
        return cost.dominant
    return "kv_capacity" if is_kv_limited else cost.dominant
