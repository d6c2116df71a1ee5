"""gRPC edge of the coordinator: validate, convert, delegate to the engine, stream events."""

from __future__ import annotations

import itertools
import queue
import secrets
import time
import uuid

from moelens.errors import InvalidArgument
from moelens.sampling_proto import sampling_from_proto
from moelens.v1 import coordinator_pb2, coordinator_pb2_grpc
from services.coordinator.request import FinishEvent, Request, TokenEvent
from services.coordinator.state import CoordinatorState


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, state: CoordinatorState):
        self.state = state
        self._seq_ids = itertools.count()

    # Generate ----------------------------------------------------------------------------------
    def _prompt_ids(self, request) -> list[int]:
        which = request.WhichOneof("input")
        if which == "text":
            if self.state.tokenizer is None:
                raise InvalidArgument("text: this model has no tokenizer.json; send token_ids")
            ids = self.state.tokenizer.encode(request.text)
        elif which == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            raise InvalidArgument("input: set text or token_ids")
        if not ids:
            raise InvalidArgument("input: the prompt is empty")
        vocab = self.state.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"token_ids: {bad[:5]} outside the vocabulary [0, {vocab})")
        return ids

    def _new_request(self, request) -> Request:
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as err:
            raise InvalidArgument(f"sampling.{err}") from None
        prompt = self._prompt_ids(request)
        req = Request(request_id=request.request_id or uuid.uuid4().hex,
                      seq_id=next(self._seq_ids), prompt_ids=prompt, params=params,
                      seed=params.seed if params.seed is not None else secrets.randbits(62),
                      final_only=request.final_only)
        if self.state.tokenizer is not None and (request.detokenize or params.stop):
            req.detokenizer = self.state.tokenizer.detokenizer()
        elif params.stop:
            raise InvalidArgument("sampling.stop: stop strings need a tokenizer.json")
        return req

    def Generate(self, request, context):
        req = self._new_request(request)
        self.state.engine.add(req)
        context.add_callback(lambda: self.state.engine.abort(req.request_id))
        while True:
            events = [req.events.get()]
            try:
                while True:
                    events.append(req.events.get_nowait())
            except queue.Empty:
                pass
            yield from self._responses(req, events)
            if any(isinstance(e, (FinishEvent, Exception)) for e in events):
                return

    def _responses(self, req: Request, events: list):
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        if tokens:
            chunk = coordinator_pb2.GenerateChunk(text="".join(e.text for e in tokens))
            for e in tokens:
                chunk.token_ids.extend(e.token_ids)
                chunk.logprobs.extend(e.logprobs)
                chunk.top_token_ids.extend(e.top_token_ids)
                chunk.top_logprobs.extend(e.top_logprobs)
            yield coordinator_pb2.GenerateResponse(request_id=req.request_id, chunk=chunk)
        for e in events:
            if isinstance(e, Exception):
                raise e
            if isinstance(e, FinishEvent):
                yield coordinator_pb2.GenerateResponse(
                    request_id=req.request_id,
                    complete=coordinator_pb2.GenerateComplete(
                        finish_reason=e.finish_reason, stop_reason=e.stop_reason,
                        usage=self._usage(req)))

    @staticmethod
    def _usage(req: Request) -> coordinator_pb2.Usage:
        now = time.monotonic()
        ttft = req.token_times_s[0] - req.arrival_s if req.token_times_s else 0.0
        return coordinator_pb2.Usage(prompt_tokens=len(req.prompt_ids),
                                     completion_tokens=len(req.output_ids),
                                     time_to_first_token_s=ttft, e2e_latency_s=now - req.arrival_s,
                                     num_preemptions=req.num_preemptions)

    # Control -----------------------------------------------------------------------------------
    def Abort(self, request, context):
        return coordinator_pb2.AbortResponse(aborted=self.state.engine.abort(request.request_id))

    def GetModelInfo(self, request, context):
        return self.state.model_info()

    def GetServerInfo(self, request, context):
        return self.state.server_info()
