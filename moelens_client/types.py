"""What the SDK returns: plain dataclasses built from the protobuf messages at the edge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from moelens.v1 import coordinator_pb2
from moelens_client.errors import InternalError

TopLogprobs = list[tuple[int, float]]
"""Top alternatives of one generated token: (token id, log-probability), most likely first."""


@dataclass(frozen=True)
class Usage:
    """Token accounting and latency of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    ttft: float
    """Seconds from arrival at the server to the first generated token."""
    e2e: float
    """Seconds from arrival at the server to completion."""
    num_preemptions: int
    """Times the request was preempted (KV blocks freed) and recomputed."""


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed event: new tokens, or (the last one, `is_final`) how the request ended."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    """Text of `token_ids` (empty unless detokenize was on)."""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    """Set on the final chunk only: "stop", "length" or "abort"."""
    stop_reason: str | None = None
    """The stop string or token that ended the request, if any."""
    usage: Usage | None = None

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationResult:
    """A whole request: every generated token, its text, why it ended and what it cost."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    usage: Usage
    logprobs: list[float] | None = None
    """Per generated token, when logprobs were requested."""
    top_logprobs: list[TopLogprobs] | None = None
    """Per generated token, when logprobs > 0 were requested."""
    stop_reason: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """The model the coordinator serves."""

    model_path: str
    model_type: str
    vocab_size: int
    max_model_len: int
    num_layers: int
    num_experts: int
    top_k: int
    num_parameters: int
    dtype: str
    has_tokenizer: bool
    eos_token_ids: list[int]


@dataclass(frozen=True)
class ServerInfo:
    """Capacity, load and performance-model figures of the running system."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    block_size: int
    token_budget: int
    max_waiting: int
    expert_address: str
    attention_address: str
    device: str
    transport: str
    num_preemptions: int
    num_steps: int
    predicted_tokens_per_s: float
    measured_tokens_per_s: float
    bottleneck: str
    pipeline: bool


_T = TypeVar("_T")


def from_message(cls: type[_T], message: Any) -> _T:
    """A dataclass whose field names match the message's (repeated fields become lists)."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(message, f.name)
        values[f.name] = list(value) if not isinstance(value, (str, bytes, int, float)) else value
    return cls(**values)


def usage_from_message(usage: coordinator_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                 ttft=usage.time_to_first_token_s, e2e=usage.e2e_latency_s,
                 num_preemptions=usage.num_preemptions)


def chunk_from_response(response: coordinator_pb2.GenerateResponse) -> GenerationChunk:
    """One GenerateResponse as a GenerationChunk (tokens, or the final completion info)."""
    if response.WhichOneof("event") == "complete":
        done = response.complete
        return GenerationChunk(request_id=response.request_id, finish_reason=done.finish_reason,
                               stop_reason=done.stop_reason or None,
                               usage=usage_from_message(done.usage))
    chunk = response.chunk
    token_ids = list(chunk.token_ids)
    top: list[TopLogprobs] = []
    if chunk.top_token_ids and token_ids:
        k = len(chunk.top_token_ids) // len(token_ids)  # flattened: k alternatives per token
        pairs = list(zip(chunk.top_token_ids, chunk.top_logprobs))
        top = [pairs[i * k:(i + 1) * k] for i in range(len(token_ids))]
    return GenerationChunk(request_id=response.request_id, token_ids=token_ids, text=chunk.text,
                           logprobs=list(chunk.logprobs), top_logprobs=top)


@dataclass
class ResultBuilder:
    """Folds the chunks of one stream into its GenerationResult."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    final: GenerationChunk | None = None

    def add(self, chunk: GenerationChunk) -> None:
        if chunk.request_id:
            self.request_id = chunk.request_id
        if chunk.is_final:
            self.final = chunk
            return
        self.token_ids.extend(chunk.token_ids)
        self.texts.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        self.top_logprobs.extend(chunk.top_logprobs)

    def result(self) -> GenerationResult:
        """The finished result; a stream that ended without its completion is a server fault."""
        if self.final is None or self.final.usage is None:
            raise InternalError(f"request {self.request_id}: stream ended without completion")
        return GenerationResult(
            request_id=self.request_id, token_ids=self.token_ids, text="".join(self.texts),
            finish_reason=self.final.finish_reason or "", usage=self.final.usage,
            logprobs=self.logprobs or None, top_logprobs=self.top_logprobs or None,
            stop_reason=self.final.stop_reason)
