"""Appending a sampled token: text delta, stop conditions, the client event.

Stop strings are matched on the generated text. Streamed text holds back the last
(longest stop string - 1) characters, so a client never sees the beginning of a stop string
that later completes (vLLM's behaviour).
"""

from __future__ import annotations

from moelens.v1 import expert_pb2
from services.coordinator.request import Request, RequestStatus, TokenEvent


class StopChecker:
    def __init__(self, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len

    def append(self, request: Request,
               sampled: expert_pb2.SampledToken) -> tuple[RequestStatus | None, str]:
        token = sampled.token_id
        request.append_token(token)
        status, reason = self._check_tokens(request, token)
        if request.detokenizer is not None:
            request.text += request.detokenizer.push([token])
            if status is not None:
                request.text += request.detokenizer.flush()
            if status is None or status == RequestStatus.FINISHED_LENGTH:
                status, reason = self._check_stop_strings(request) or (status, reason)
        request.publish(self._event(request, sampled, is_final=status is not None))
        return status, reason

    def _check_tokens(self, request: Request, token: int) -> tuple[RequestStatus | None, str]:
        p = request.params
        num_out = len(request.output_ids)
        if num_out > p.min_tokens:  # earlier EOS/stop ids were suppressed by the sampler
            if not p.ignore_eos and token in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, ""
            if token in p.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, str(token)
        if num_out >= p.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, ""
        return None, ""

    @staticmethod
    def _check_stop_strings(request: Request) -> tuple[RequestStatus, str] | None:
        stops = request.params.stop
        if not stops or len(request.output_ids) < request.params.min_tokens:
            return None
        window_start = max(0, request.num_text_sent - max(len(s) for s in stops))
        hits = [(request.text.find(s, window_start), s) for s in stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        request.text = request.text[:index]
        return RequestStatus.FINISHED_STOPPED, stop

    @staticmethod
    def _event(request: Request, sampled, is_final: bool) -> TokenEvent:
        holdback = 0 if is_final else max((len(s) for s in request.params.stop), default=1) - 1
        end = max(request.num_text_sent, len(request.text) - holdback)
        delta = request.text[request.num_text_sent:end]
        request.num_text_sent = end
        event = TokenEvent(token_ids=[sampled.token_id], text=delta)
        if request.params.logprobs is not None:
            event.logprobs = [sampled.logprob]
            event.top_token_ids = list(sampled.top_token_ids)
            event.top_logprobs = list(sampled.top_logprobs)
        return event
