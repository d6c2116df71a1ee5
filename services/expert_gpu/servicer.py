"""gRPC edge of the expert service: protobuf <-> runner calls and per-sequence sampling state."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from moelens.compute_loop import ComputeLoop
from moelens.errors import InvalidArgument
from moelens.sampling import RowSampling, SamplingParams
from moelens.sampling_proto import sampling_from_proto
from moelens.v1 import expert_pb2, expert_pb2_grpc
from services.expert_gpu.runner import SeqStep
from services.expert_gpu.worker import ExpertWorker

log = logging.getLogger(__name__)


@dataclass
class _SeqState:
    params: SamplingParams
    seed: int
    suppress_until_min: tuple[int, ...]  # EOS + stop ids, banned while num_generated < min_tokens


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, worker: ExpertWorker, compute: ComputeLoop, metrics=None):
        self.worker, self.compute, self.metrics = worker, compute, metrics
        self.seqs: dict[int, _SeqState] = {}

    def Info(self, request, context):
        return self.worker.info()

    def Warmup(self, request, context):
        return self.compute.call(self.worker.warmup)

    def FreeSequences(self, request, context):
        for seq_id in request.seq_ids:
            self.seqs.pop(seq_id, None)
        return expert_pb2.ExpertFreeResponse()

    def Step(self, request, context):
        for seq_id in request.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        seqs, rows = self._decode_plan(request)
        # one step at a time (the layers are a pipeline), on the compute thread
        out, timings = self.compute.call(self.worker.step, request.step_id, seqs, rows,
                                         request.pipeline)
        if self.metrics:
            self.metrics.observe_step(timings, sum(len(s.token_ids) for s in seqs))
        return self._encode_output(request, seqs, rows, out, timings)

    def _decode_plan(self, request) -> tuple[list[SeqStep], list[RowSampling]]:
        seqs, rows = [], []
        for sp in request.sequences:
            if sp.HasField("sampling"):
                params = sampling_from_proto(sp.sampling)
                banned = tuple(params.stop_token_ids) + self.worker.eos_token_ids
                self.seqs[sp.seq_id] = _SeqState(params, sp.seed, banned)
            state = self.seqs.get(sp.seq_id)
            if state is None:
                raise InvalidArgument(f"sequences[{sp.seq_id}]: first step of a sequence must "
                                      f"carry its sampling parameters")
            if not sp.token_ids:
                raise InvalidArgument(f"sequences[{sp.seq_id}].token_ids is empty")
            seqs.append(SeqStep(seq_id=sp.seq_id, token_ids=list(sp.token_ids),
                                start_position=sp.start_position, block_ids=list(sp.block_ids),
                                emit=sp.emit))
            if sp.emit:
                suppress = state.suppress_until_min if sp.num_generated < state.params.min_tokens else ()
                rows.append(RowSampling(state.params, state.seed, sp.num_generated, suppress))
        self.worker.validate(seqs)
        return seqs, rows

    def _encode_output(self, request, seqs, rows, out, timings) -> expert_pb2.StepOutput:
        response = expert_pb2.StepOutput(step_id=request.step_id,
                                         num_tokens=sum(len(s.token_ids) for s in seqs))
        for field_name, value in vars(timings).items():
            setattr(response.timings, field_name, value)
        emitting = [s for s in seqs if s.emit]
        for i, (s, row) in enumerate(zip(emitting, rows)):
            token = response.tokens.add(seq_id=s.seq_id, token_id=int(out.token_ids[i]),
                                        logprob=float(out.logprobs[i]))
            width = row.params.logprobs or 0
            if width:
                token.top_token_ids.extend(out.top_ids[i, :width].tolist())
                token.top_logprobs.extend(out.top_logprobs[i, :width].tolist())
        return response
