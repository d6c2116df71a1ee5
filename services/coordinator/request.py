"""One request's life: its tokens, its status, and what it has told its client."""

from __future__ import annotations

import enum
import queue
import time
from dataclasses import dataclass, field

from moelens.sampling import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered by life: anything >= FINISHED_STOPPED is done."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASON = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                 RequestStatus.FINISHED_ABORTED: "abort"}


@dataclass
class TokenEvent:
    """New tokens for the client (and optionally their log-probabilities)."""

    token_ids: list[int]
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)

    def extend(self, later: "TokenEvent") -> None:
        """Append a later event's tokens (the one chunk of a final-only stream)."""
        self.token_ids += later.token_ids
        self.text += later.text
        self.logprobs += later.logprobs
        self.top_token_ids += later.top_token_ids
        self.top_logprobs += later.top_logprobs


@dataclass
class FinishEvent:
    finish_reason: str
    stop_reason: str = ""


@dataclass
class Request:
    request_id: str
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival_s: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose K/V are in the cache."""
    is_params_sent: bool = False
    """The expert service holds this request's sampling parameters."""
    num_preemptions: int = 0
    first_scheduled_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue)
    """TokenEvent / FinishEvent / Exception for the client stream, in order (see `publish`)."""
    final_only: bool = False
    """The client wants one chunk at the end: token events are held until then."""
    held: TokenEvent | None = None
    """The token events held back so far, merged into one."""
    detokenizer: object | None = None
    """IncrementalDetokenizer when text is wanted (detokenize or stop strings)."""
    text: str = ""
    """Generated text so far (when detokenizing)."""
    num_text_sent: int = 0
    """Characters of `text` already streamed (the rest may be the start of a stop string)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to compute before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]

    def append_token(self, token_id: int) -> None:
        """The one place output grows (the sampled token's K/V is computed next step)."""
        self.output_ids.append(token_id)
        self.token_times_s.append(time.monotonic())

    def finish(self, status: RequestStatus, stop_reason: str = "") -> None:
        self.status = status
        self.publish(FinishEvent(FINISH_REASON[status], stop_reason))

    def publish(self, event: TokenEvent | FinishEvent | Exception) -> None:
        """Hand an event to the client stream; a final-only request's token events wait, merged,
        for the event that ends the stream."""
        if self.final_only and isinstance(event, TokenEvent):
            if self.held is None:
                self.held = event
            else:
                self.held.extend(event)
            return
        if self.held is not None:
            self.events.put(self.held)
            self.held = None
        self.events.put(event)

    def reset_for_recompute(self) -> None:
        """Preempted: its cache is gone; prompt + output so far will be recomputed."""
        self.status = RequestStatus.PREEMPTED
        self.num_computed = 0
        self.is_params_sent = False
        self.num_preemptions += 1
