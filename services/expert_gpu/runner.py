"""One step on the expert service: every layer's GEMMs here, attention on attention_cpu.

Legend: T new tokens of a group, Hq/Hkv heads, D head_dim, H hidden, V vocab.

Two-group pipeline (the paper's VSLPipe): the step's sequences are split into two groups of
about equal token count. The exchange stream carries group A's layer-L attention while this
service computes group B's GEMMs, then the roles swap:

    pre(A,0) send(A,0) pre(B,0) send(B,0)
    for L: recv(A,L) post(A,L) pre(A,L+1) send(A,L+1)  recv(B,L) post(B,L) pre(B,L+1) send(B,L+1)

With the pipeline off there is one group and the service waits for each layer's attention.
Sequences with no cached prefix get their causal attention here (prefill). Pipelined, it runs
while the attention service works on the other rows; otherwise (a CPU-only host, where both
services share the cores) after the layer's attention has come back, so the two services'
thread teams never compete for the same cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from moelens import panel_gemm
from moelens.config import ModelConfig
from moelens.kv_cache import slots_for_positions
from moelens.model.attention import prefill_attention
from moelens.model.forward import ForwardBatch, split_attention
from moelens.model.sampling import SampleOutput, sample
from moelens.model.stages import (Rope, embed, final_logits, post_attention, pre_attention,
                                   rope_tables)
from moelens.model.weights import ModelWeights
from moelens.sampling import RowSampling
from moelens.stats import StepTimings
from moelens.v1 import attention_pb2
from services.expert_gpu.attention_client import AttentionClient
from services.expert_gpu.layer_store import LayerStore


@dataclass
class SeqStep:
    """One sequence's share of a step (domain form of the proto SequencePlan)."""

    seq_id: int
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    emit: bool


Rows = torch.Tensor | slice


def row_selector(rows: torch.Tensor) -> Rows:
    """An index for ascending rows [R] of a group: the slice they span when they are consecutive
    (a step's decode rows come first, its new prompts after), so taking them is a view and
    putting them a plain copy, not a gather or scatter every layer; else the rows themselves."""
    n = rows.numel()
    if n and int(rows[-1]) - int(rows[0]) == n - 1:
        return slice(int(rows[0]), int(rows[0]) + n)
    return rows


def take_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def put_rows(x: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    if isinstance(rows, slice):
        x[rows] = values
    else:
        x.index_copy_(0, rows, values)


@dataclass
class _Group:
    index: int
    seqs: list[SeqStep]
    batch: ForwardBatch
    plan: attention_pb2.AttentionPlan
    split: object
    rope: Rope  # the group's rotary tables, shared by all layers
    fresh: Rows  # split.fresh_rows as row_selector gives them
    paged: Rows  # split.paged_rows likewise
    hidden: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    fresh_qkv: tuple | None = None  # this layer's q, k, v of fresh prompts, until attended
    send_s: float = 0.0  # seconds the last send_layer took, settled by the matching _recv
    emit_order: list[int] = field(default_factory=list)  # positions in the step's emit list

    @property
    def all_paged(self) -> bool:
        """Every token reads the cache (a decode step): q goes out and o comes back whole."""
        return not self.split.fresh_seq_lens and len(self.split.paged_rows) == \
            len(self.batch.token_ids)


@dataclass
class _Clock:
    timings: StepTimings
    is_cuda: bool

    def now(self) -> float:
        if self.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def settle_exchange(timings: StepTimings, send_s: float, waited_s: float,
                    attention_s: float) -> None:
    """Account one layer's round trip: `send_s` in send_layer, `waited_s` in recv_out, and the
    attention service's own `attention_s`. That service may run inside the send: waking it
    hands it this CPU, and the send returns after its work (most decode layers on 2 vCPUs). So
    the exchange is the time blocked in both calls that the attention does not explain, and
    attention beyond that time ran while this thread computed (prefill attention): overlap."""
    blocked = send_s + waited_s
    timings.attention_s += attention_s
    timings.exchange_s += max(0.0, blocked - attention_s)
    timings.overlap_s += max(0.0, attention_s - blocked)


def split_groups(seqs: list[SeqStep], pipeline: bool) -> list[list[int]]:
    """Indices of seqs per group: two groups of about equal token count, order kept."""
    if not pipeline or len(seqs) < 2:
        return [list(range(len(seqs)))]
    total = sum(len(s.token_ids) for s in seqs)
    first, tokens = [], 0
    for i, s in enumerate(seqs):
        if tokens >= total / 2 or len(first) == len(seqs) - 1:
            break
        first.append(i)
        tokens += len(s.token_ids)
    return [first, list(range(len(first), len(seqs)))]


def _panel_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             seq_lens: list[int], scale: float) -> torch.Tensor:
    """prefill_attention on the panel kernel (fp32 only): q [T, Hq, D], k, v [T, Hkv, D]."""
    out = panel_gemm.causal_attention(q.float(), k.float(), v.float(), seq_lens, scale)
    return out.to(q.dtype)


class StepRunner:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, store: LayerStore,
                 attention: AttentionClient, device: torch.device, inv_freq: torch.Tensor,
                 panels: bool = False):
        self.cfg, self.weights, self.store = cfg, weights, store
        self.attention, self.device, self.inv_freq = attention, device, inv_freq
        self.block_size = attention.info.block_size
        self.scale = cfg.head_dim ** -0.5
        self.dtype = weights.embed.dtype
        # the CPU device's panel kernels run prefill attention too (1.4-2.4x torch's SDPA there),
        # bf16 models' in fp32 on their q, k and v
        self.prefill_attention = _panel_prefill_attention if panels else prefill_attention

    def run(self, step_id: int, seqs: list[SeqStep], rows: list[RowSampling],
            pipeline: bool) -> tuple[SampleOutput, StepTimings]:
        clock = _Clock(StepTimings(), self.device.type == "cuda")
        start = clock.now()
        groups = self._make_groups(seqs, pipeline)
        self._run_layers(step_id, groups, clock, overlap=pipeline)
        t0 = clock.now()
        logits = self._logits(groups, sum(s.emit for s in seqs))
        t1 = clock.now()
        out = sample(logits, rows) if rows else None
        t2 = clock.now()
        clock.timings.gemm_s += t1 - t0
        clock.timings.sample_s = t2 - t1
        clock.timings.weight_wait_s, clock.timings.weight_bytes_streamed = self.store.take_counters()
        clock.timings.total_s = t2 - start
        return out, clock.timings

    # Batches -----------------------------------------------------------------------------------
    def _make_groups(self, seqs: list[SeqStep], pipeline: bool) -> list[_Group]:
        groups, emit_index = [], 0
        for g, members in enumerate(split_groups(seqs, pipeline)):
            group = self._group(g, [seqs[i] for i in members])
            for s in group.seqs:
                if s.emit:
                    group.emit_order.append(emit_index)
                    emit_index += 1
            groups.append(group)
        return groups

    def _group(self, index: int, seqs: list[SeqStep]) -> _Group:
        ids, pos, slots, emit = [], [], [], []
        for s in seqs:
            positions = range(s.start_position, s.start_position + len(s.token_ids))
            ids += s.token_ids
            pos += positions
            slots += slots_for_positions(s.block_ids, positions, self.block_size)
            if s.emit:
                emit.append(len(ids) - 1)
        dev = self.device
        batch = ForwardBatch(
            token_ids=torch.tensor(ids, device=dev), positions=torch.tensor(pos, device=dev),
            seq_lens=[len(s.token_ids) for s in seqs], block_tables=[s.block_ids for s in seqs],
            slots=torch.tensor(slots), emit_rows=torch.tensor(emit, dtype=torch.int64, device=dev))
        split = split_attention(batch)
        fresh, paged = row_selector(split.fresh_rows), row_selector(split.paged_rows)
        # the row indices go to the device once per step, not in every layer
        split = replace(split, fresh_rows=split.fresh_rows.to(dev),
                        paged_rows=split.paged_rows.to(dev))
        return _Group(index=index, seqs=seqs, batch=batch, split=split,
                      plan=self._plan(seqs, slots),
                      rope=rope_tables(batch.positions, self.inv_freq, self.dtype),
                      fresh=fresh if isinstance(fresh, slice) else split.fresh_rows,
                      paged=paged if isinstance(paged, slice) else split.paged_rows)

    def _plan(self, seqs: list[SeqStep], slots: list[int]) -> attention_pb2.AttentionPlan:
        plan = attention_pb2.AttentionPlan(slots=slots)
        for i, s in enumerate(seqs):
            plan.sequences.add(seq_id=s.seq_id, block_ids=s.block_ids)
            if s.start_position > 0:
                plan.row_sequence.extend([i] * len(s.token_ids))
                plan.row_context_len.extend(
                    range(s.start_position + 1, s.start_position + len(s.token_ids) + 1))
        return plan

    # Layers ------------------------------------------------------------------------------------
    def _run_layers(self, step_id: int, groups: list[_Group], clock: _Clock,
                    overlap: bool) -> None:
        held: dict[int, object] = {}

        def weights_of(layer: int):
            if layer not in held:
                held[layer] = self.store.layer(layer)
            return held[layer]

        for g in groups:
            g.hidden = embed(self.weights, g.batch.token_ids)  # [T, H]
            self._pre_and_send(step_id, g, 0, weights_of(0), clock, overlap)
        num_layers = self.cfg.num_layers
        for layer in range(num_layers):
            for g in groups:
                self._recv(g, clock)
                self._prefill(g, clock)  # no-op when it ran while the attention service worked
                t0 = clock.now()
                g.hidden = post_attention(self.cfg, weights_of(layer), g.hidden, g.attn)
                clock.timings.gemm_s += clock.now() - t0
                if layer + 1 < num_layers:
                    self._pre_and_send(step_id, g, layer + 1, weights_of(layer + 1), clock,
                                       overlap)
            self.store.release(layer)
            del held[layer]

    def _pre_and_send(self, step_id: int, g: _Group, layer: int, lw, clock: _Clock,
                      overlap: bool) -> None:
        t0 = clock.now()
        q, k, v = pre_attention(self.cfg, lw, g.hidden, g.rope)
        t1 = clock.now()
        request = attention_pb2.LayerRequest(step_id=step_id, layer=layer, group=g.index)
        if layer == 0:
            request.plan.CopyFrom(g.plan)
        # in the compute dtype: bf16 halves the bytes, and the attention service stores K and V
        # in its pool dtype and widens q itself; o comes back in the same dtype
        self.attention.send_layer(request, {"k": k, "v": v, "q": take_rows(q, g.paged)})
        t2 = clock.now()
        g.attn = None if g.all_paged else torch.empty_like(q)  # [T, Hq, D]
        if g.split.fresh_seq_lens:
            g.fresh_qkv = tuple(take_rows(t, g.fresh) for t in (q, k, v))
        g.send_s = t2 - t1
        clock.timings.gemm_s += t1 - t0
        if overlap:
            self._prefill(g, clock)

    def _prefill(self, g: _Group, clock: _Clock) -> None:
        """Causal attention of the group's fresh prompts for the layer last sent."""
        if g.fresh_qkv is None:
            return
        t0 = clock.now()
        put_rows(g.attn, g.fresh, self.prefill_attention(*g.fresh_qkv, g.split.fresh_seq_lens,
                                                         self.scale))
        g.fresh_qkv = None
        clock.timings.prefill_attention_s += clock.now() - t0

    def _recv(self, g: _Group, clock: _Clock) -> None:
        t0 = clock.now()
        response, out = self.attention.recv_out()
        waited = clock.now() - t0
        if g.all_paged:
            # o itself: a view of the response slot, read by post_attention before this
            # group's next response can land there
            g.attn = out.to(self.device, self.dtype)
        elif g.split.paged_rows.numel():
            put_rows(g.attn, g.paged, out.to(self.device, self.dtype))
        settle_exchange(clock.timings, g.send_s, waited, response.attention_s)

    def _logits(self, groups: list[_Group], num_emit: int) -> torch.Tensor:
        """[E, V] fp32 logits of every emitting sequence, in the step's sequence order (one
        group's are already: [E, V] is tens of MB at a large vocabulary, not copied again)."""
        parts = [(g.emit_order, final_logits(self.cfg, self.weights, g.hidden,
                                             g.batch.emit_rows)) for g in groups if g.emit_order]
        if len(parts) == 1 and parts[0][0] == list(range(num_emit)):
            return parts[0][1]
        logits = torch.empty(num_emit, self.cfg.vocab_size, device=self.device)
        for order, rows in parts:
            logits.index_copy_(0, torch.tensor(order, device=self.device), rows)
        return logits
