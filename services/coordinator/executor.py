"""Runs a scheduled step on the compute services: plan out (ids), sampled tokens back.

A request's prompt and sampling parameters cross once (again after a preemption); later steps
carry its id, its new token, its block table and the ids of finished sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from moelens.errors import Unavailable
from moelens.grpc_server import CHANNEL_OPTIONS
from moelens.sampling_proto import sampling_to_proto
from moelens.stats import StepTimings
from moelens.v1 import attention_pb2, attention_pb2_grpc, expert_pb2, expert_pb2_grpc
from services.coordinator.scheduler import SchedulerOutput

STEP_TIMEOUT_S = 600.0


@dataclass
class StepResult:
    step_id: int
    tokens: dict[int, expert_pb2.SampledToken]  # by seq_id
    timings: StepTimings
    wall_s: float


class Executor:
    def __init__(self, expert_address: str, attention_address: str, pipeline: bool = False):
        self.expert_address, self.attention_address = expert_address, attention_address
        self.pipeline = pipeline
        self._expert_channel = grpc.insecure_channel(expert_address, options=CHANNEL_OPTIONS)
        self._attention_channel = grpc.insecure_channel(attention_address)
        self.expert = expert_pb2_grpc.ExpertServiceStub(self._expert_channel)
        self.attention = attention_pb2_grpc.AttentionServiceStub(self._attention_channel)
        self._finished: list[int] = []
        self._step_id = 0

    def _call(self, name: str, address: str, method, request, timeout: float):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"{name} service at {address} is unavailable: "
                                  f"{err.details()}") from None
            raise

    def plan(self, out: SchedulerOutput) -> expert_pb2.StepPlan:
        self._step_id += 1
        plan = expert_pb2.StepPlan(step_id=self._step_id, pipeline=self.pipeline,
                                   finished_seq_ids=self._finished)
        self._finished = []
        for s in out.scheduled:
            r = s.request
            sp = plan.sequences.add(
                seq_id=r.seq_id, token_ids=r.token_slice(r.num_computed,
                                                         r.num_computed + s.num_new_tokens),
                start_position=r.num_computed, block_ids=s.block_table, emit=s.is_emitting,
                num_generated=len(r.output_ids))
            if not r.is_params_sent:
                sp.sampling.CopyFrom(sampling_to_proto(r.params))
                sp.seed = r.seed
        return plan

    def execute(self, out: SchedulerOutput) -> StepResult:
        self._free_preempted(out)
        plan = self.plan(out)
        start = time.perf_counter()
        reply = self._call("expert", self.expert_address, self.expert.Step, plan, STEP_TIMEOUT_S)
        wall = time.perf_counter() - start
        timings = StepTimings(**{f: getattr(reply.timings, f) for f in vars(StepTimings())})
        return StepResult(step_id=reply.step_id, tokens={t.seq_id: t for t in reply.tokens},
                          timings=timings, wall_s=wall)

    def _free_preempted(self, out: SchedulerOutput) -> None:
        ids = [r.seq_id for r in out.preempted]
        if ids:
            self._free_attention(ids)

    def release(self, seq_ids: list[int]) -> None:
        """Sequences ended: their blocks go now (one RPC for all: the last step of a
        256-request job ends them all), the expert forgets them with the next plan."""
        if seq_ids:
            self._finished += seq_ids
            self._free_attention(seq_ids)

    def _free_attention(self, seq_ids: list[int]) -> None:
        self._call("attention", self.attention_address, self.attention.FreeSequences,
                   attention_pb2.FreeSequencesRequest(seq_ids=seq_ids), 30.0)

    def attention_info(self) -> attention_pb2.AttentionInfo:
        return self._call("attention", self.attention_address, self.attention.Info,
                          attention_pb2.AttentionInfoRequest(), 30.0)

    def expert_info(self) -> expert_pb2.ExpertInfo:
        return self._call("expert", self.expert_address, self.expert.Info,
                          expert_pb2.ExpertInfoRequest(), 30.0)

    def close(self) -> None:
        self._expert_channel.close()
        self._attention_channel.close()
