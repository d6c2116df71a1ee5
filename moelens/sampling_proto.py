"""SamplingParams <-> the `moelens.v1.SamplingParams` message, in one place for every service."""

from __future__ import annotations

from moelens.sampling import SamplingParams
from moelens.v1 import common_pb2

_OPTIONAL = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "ignore_eos")


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields keep the dataclass defaults; invalid values raise ValueError."""
    fields = {name: getattr(p, name) for name in _OPTIONAL if p.HasField(name)}
    if p.HasField("seed"):
        fields["seed"] = p.seed
    if p.want_logprobs:
        fields["logprobs"] = p.logprobs
    return SamplingParams(**fields, stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids))


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens, min_tokens=p.min_tokens, temperature=p.temperature,
        top_p=p.top_p, top_k=p.top_k, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos, want_logprobs=p.logprobs is not None, logprobs=p.logprobs or 0)
    if p.seed is not None:
        msg.seed = p.seed
    return msg
