"""Sampling parameters: validated once where a request enters, carried by id afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops (vLLM semantics)."""

    max_tokens: int = 16
    """Tokens to generate at most."""
    min_tokens: int = 0
    """EOS and stop tokens are suppressed until this many tokens exist."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = all."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever the batch."""
    stop: tuple[str, ...] = ()
    """Stop strings (matched on the detokenised text; not included in the output)."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's and the top k alternatives'."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]"),
            (self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 = disabled)"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (all(s for s in self.stop), "stop", "stop strings must be non-empty"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class RowSampling:
    """What the sampler needs for one emitting row: the params and the seed stream position."""

    params: SamplingParams
    seed: int
    """Effective seed (the request's, or one drawn at admission)."""
    step: int
    """Index of the token being drawn: (seed, step) fixes the random draw, so a preempted and
    recomputed request draws the same tokens."""
    suppress_token_ids: tuple[int, ...] = field(default=())
    """Tokens banned for this draw (EOS/stop ids before min_tokens)."""
