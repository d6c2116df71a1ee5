"""Building GenerateRequests: client-side validation with the server's own rules.

Sampling keyword arguments are checked with moelens.sampling.SamplingParams (the class the
coordinator validates with), so a bad value fails here, before anything is sent, with the same
message the server would give. Only the fields the caller set are sent; the rest take the
server's defaults, which are that class's defaults.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Mapping, Sequence

from moelens.sampling import SamplingParams
from moelens.v1 import common_pb2, coordinator_pb2
from moelens_client.errors import InvalidArgumentError

MAX_MESSAGE_BYTES = 1 << 30  # a long prompt's ids or a stream with top logprobs fits
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
"""Keyword arguments generate() accepts for sampling (logprobs: None = not returned)."""

Prompt = str | Sequence[int]


def validate_sampling(sampling: Mapping[str, Any]) -> SamplingParams:
    """The SamplingParams these keywords give (None values = default); InvalidArgumentError
    naming the field otherwise."""
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise InvalidArgumentError(f"unknown sampling parameter(s) {unknown}; expected some of "
                                   f"{list(SAMPLING_FIELDS)}")
    given = {k: v for k, v in sampling.items() if v is not None}
    for name, value in given.items():
        _check_type(name, value)
    for name in ("stop", "stop_token_ids"):
        if name in given:
            given[name] = (given[name],) if isinstance(given[name], str) else tuple(given[name])
    try:
        return SamplingParams(**given)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(str(err)) from None


def sampling_message(sampling: Mapping[str, Any]) -> common_pb2.SamplingParams:
    """Validate, then copy only the fields the caller set into the protobuf message."""
    params = validate_sampling(sampling)
    message = common_pb2.SamplingParams()
    for name, value in sampling.items():
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(message, name).extend(getattr(params, name))
        else:
            setattr(message, name, getattr(params, name))
    if sampling.get("logprobs") is not None:
        message.want_logprobs = True
    return message


def build_request(prompt: Prompt, *, request_id: str | None = None,
                  detokenize: bool | None = None, final_only: bool = False,
                  **sampling: Any) -> coordinator_pb2.GenerateRequest:
    """A validated GenerateRequest; the id is chosen here when not given, so abort() can use it
    before the first chunk arrives. detokenize=None streams text only for text prompts;
    final_only asks for all tokens in one chunk at the end (callers that want only the result)."""
    request = coordinator_pb2.GenerateRequest(
        request_id=request_id or uuid.uuid4().hex, sampling=sampling_message(sampling),
        detokenize=isinstance(prompt, str) if detokenize is None else bool(detokenize),
        final_only=final_only)
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidArgumentError("prompt must be non-empty")
        request.text = prompt
        return request
    ids = list(prompt) if isinstance(prompt, Sequence) else None
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise InvalidArgumentError("prompt must be a non-empty str or a non-empty list of token "
                                   f"ids (ints >= 0), got {_short(prompt)}")
    request.token_ids.ids.extend(ids)
    return request


def build_batch(prompts: Sequence[Prompt], overrides: Sequence[Mapping[str, Any]] | None,
                defaults: Mapping[str, Any],
                detokenize: bool | None) -> list[coordinator_pb2.GenerateRequest]:
    """Every request of a batch, all validated before any is sent ("prompt i: ..." on error);
    final-only, since a batch returns results."""
    if overrides is not None and len(overrides) != len(prompts):
        raise InvalidArgumentError(f"overrides has {len(overrides)} entries for "
                                   f"{len(prompts)} prompts; pass one dict per prompt")
    requests = []
    for i, prompt in enumerate(prompts):
        sampling = {**defaults, **(overrides[i] if overrides is not None else {})}
        try:
            requests.append(build_request(prompt, detokenize=detokenize, final_only=True,
                                          **sampling))
        except InvalidArgumentError as err:
            raise err.with_prefix(f"prompt {i}: ") from None
    return requests


_NUMBER_FIELDS = ("temperature", "top_p")
_BOOL_FIELDS = ("ignore_eos",)
_LIST_FIELDS = {"stop": str, "stop_token_ids": int}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_type(name: str, value: Any) -> None:
    """Type errors name the field (SamplingParams' own checks would fail with a bare TypeError)."""
    if name in _NUMBER_FIELDS:
        ok, want = _is_int(value) or isinstance(value, float), "a number"
    elif name in _BOOL_FIELDS:
        ok, want = isinstance(value, bool), "true or false"
    elif name in _LIST_FIELDS:
        kind = _LIST_FIELDS[name]
        items = [value] if isinstance(value, str) else value
        ok = isinstance(items, (list, tuple)) and all(
            isinstance(v, kind) and not isinstance(v, bool) for v in items)
        want = f"a list of {kind.__name__}"
    else:
        ok, want = _is_int(value), "an int"
    if not ok:
        raise InvalidArgumentError(f"{name} must be {want}, got {_short(value)}")


def check_concurrency(max_concurrency: int) -> None:
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
