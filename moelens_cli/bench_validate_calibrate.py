"""What `bench validate` measures besides the services' warmup profile: the system's StepOverheads.

The hardware profile times kernels in isolation. A real iteration also runs the coordinator's
Python (schedule, plan, token events), the Step RPC, embedding and sampling, the per-layer
activation exchange between two processes (thread wake-ups included), and the expert-side causal
attention of fresh prompts (SDPA, one call per sequence). Six short calibration jobs through
the running services — never the validated point's own job — measure them with the services'
own phase timers (the coordinator's /metrics):

- A: 1 request and B: `num_seqs` requests of 8-token prompts decoding 64 tokens together;
- C, D, E: prompts of b, b/2 and b/4 tokens filling the token budget b (512 in bench validate)
  1, 2 and 4 to an iteration, 6 iterations each (above 1024 tokens, b is split into
  ceil(b / 1024) prompts: 1024, 512 and 256 tokens, 8, 16 and 32 to an iteration at b = 8192);
- F: 4 × `num_seqs` requests of 8-token prompts generating 4 tokens (admissions and completions).

Prefill attention: the prefill_attention phase of A…F per layer, fitted as
per_seq · sequences + per_token · Σ l + per_flop · 2·q_size·Σ l² (non-negative least squares).
In-situ GEMM terms: the expert's gemm phase in A…F against what the profile's GEMM curve
prices for the same jobs, as seconds added per layer per iteration whatever its size (A and B
measure mostly that) and a scale on the curve (C…E mostly that). The warmup times the layers
with the other services idle; inside a job the compute threads wake after each exchange, and
the coordinator, the clients' gRPC streams and the attention service run between the GEMMs on
the same cores and caches. The exchange is scaled in two parts
(in a job it costs ~2× the warmup's round trip, where both processes spin on an idle machine),
and the paged attention's time beyond its KV bytes, fitted non-negative as seconds per call
(the plan, the wake-up), per paged query row (each row's item: q in, softmax state, o out) and
per token stored (the step's K and V into their slots): A…F read little KV, so this is what
they measure; A and B (1 and 24 decode rows a call) separate the first two, C…E (hundreds of
prompt tokens stored, no paged rows) the third.
Step overhead: wall time of each of A…F minus what the model prices for the same job (its
scheduler replay with the prefill-attention fit and the in-situ terms above): the coordinator's
Python, the Step RPC, sampling and embedding. Fitted, non-negative, as a cost per iteration, per
scheduled sequence per iteration, per token of the iteration and per request (admission and
completion): A and B (64 iterations of 1 and `num_seqs` sequences, a token each) give the first
and the sum of the next two, C…E (the same 512 tokens an iteration, 1, 2 and 4 requests) the
first plus 512 of the third, and the sum of the second and the fourth; F (96 requests at
bench validate's cap) pins the fourth. Without the per-token term (until session 17) the Python
lists of 512 prompt tokens a step were priced per request, ~2.9 ms each, and the jobs of many
short prompts came out 5-10% slow. With the per-request term left out (a line through A and B only,
sessions 3–8) the jobs of many short requests were predicted 10–20% fast on session 9's machine
and the long ones slow: the per-request costs had been spread over every decode step.
"""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass, replace

import numpy as np

from services.coordinator.perf_model import StepOverheads

CALIBRATION_PROMPT, CALIBRATION_GEN = 8, 64
CALIBRATION_SEQS = 24
"""Sequences of job B when the deployment has no running-sequence cap."""
LONG_PROMPT, PREFILL_STEPS, PROMPTS_PER_STEP = 512, 6, (1, 2, 4)
"""Prefill calibration: PREFILL_STEPS iterations each of 1, 2 and 4 prompts filling the token
budget (LONG_PROMPT when there is none): the in-situ GEMM scale is measured at the iteration size
the job runs at (scaled at 512 tokens, the prediction for bench-mixtral's 256-request job with
its ~1100-token iterations was 12% pessimistic; scaled at the budget, 3%). Three lengths keep
the per-token and per-FLOP terms apart; six iterations each average the machine's noise."""
SHORT_GEN, SHORT_ROUNDS = 4, 4
"""Job F: SHORT_ROUNDS × `num_seqs` requests of CALIBRATION_PROMPT tokens generating SHORT_GEN,
mostly admission and completion: with only C…E's 6-24 requests (a few tens of ms of overhead in
all) the per-request term came out anywhere from 0.2 to 3.3 ms from one point to the next, and
the per-token term with it (session 17)."""
MAX_PROMPT = 1024
"""Longest calibration prompt: a larger budget is filled with more prompts, not longer ones.
Prefill attention grows with the square of the prompt; 8192-token prompts (a budget of 8192)
made the calibration and its attention fit about attention work no served job of short prompts
has (the 256-request job was then predicted 14% slow, likely for that reason)."""
_SETTLE_TRIES, _SETTLE_S = 40, 0.05
ATTENTION_TERMS = ("attention_s_per_layer", "attention_s_per_row", "attention_s_per_token")
STEP_TERMS = ("step_fixed_s", "step_s_per_seq", "step_s_per_token", "request_s")
PART_SCALES = {"gemm": ("gemm_layer_s", "gemm_scale"),
               "exchange": ("exchange_fixed_scale", "exchange_byte_scale")}
"""The phases priced in two parts with one in-situ term each (fit_part_scales)."""
PART_FIT_ROUNDS = 3
"""Gauss-Newton rounds of fit_part_scales: the exchange's latency part is what the fresh
prompts' causal attention leaves visible, not linear in its scale."""


def nonnegative_lstsq(columns: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares through the origin with every coefficient >= 0: a coefficient that would
    come out negative is dropped and the rest refitted (columns [N, C] -> C coefficients)."""
    kept = list(range(columns.shape[1]))
    while kept:
        coef, *_ = np.linalg.lstsq(columns[:, kept], y, rcond=None)
        if (coef >= 0).all():
            out = [0.0] * columns.shape[1]
            for index, value in zip(kept, coef):
                out[index] = float(value)
            return out
        kept.pop(int(np.argmin(coef)))
    return [0.0] * columns.shape[1]


def fit_prefill_attention(shapes: list[tuple[int, int]], seconds: list[float],
                          q_size: int) -> tuple[float, float, float]:
    """(seconds per sequence, per token, per FLOP) of `count` fresh sequences of `length` tokens
    per (length, count) shape (nonnegative_lstsq)."""
    columns = np.array([[count, count * length, 2.0 * q_size * count * length ** 2]
                        for length, count in shapes], dtype=float)  # [S, 3]
    per_seq, per_token, per_flop = nonnegative_lstsq(columns, np.array(seconds, dtype=float))
    return per_seq, per_token, per_flop


_SAMPLE = re.compile(r'^(moelens_step_\w+?)(?:\{phase="(\w+)"\})?\s+(\S+)$')


def scrape_steps(url: str) -> dict[str, float]:
    """From the coordinator's /metrics: "steps" (the step count) and the summed seconds of each
    expert-side phase ("gemm", "attention", ...)."""
    with urllib.request.urlopen(url, timeout=5.0) as reply:  # loopback only
        text = reply.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        found = _SAMPLE.match(line.strip())
        if not found:
            continue
        name, phase, value = found.groups()
        if name == "moelens_step_duration_seconds_count":
            values["steps"] = float(value)
        elif name == "moelens_step_phase_seconds_sum" and phase:
            values[phase] = float(value)
    return values


def _scrape_after(url: str, steps_before: float, num_steps: int) -> dict[str, float]:
    """The series once the exporter has seen `num_steps` more steps (the engine streams a
    request's last token before it records the step)."""
    values = scrape_steps(url)
    for _ in range(_SETTLE_TRIES):
        if values.get("steps", 0) >= steps_before + num_steps:
            break
        time.sleep(_SETTLE_S)
        values = scrape_steps(url)
    return values


def scrape_settled(url: str) -> dict[str, float]:
    """The series once the step count has stopped moving (after a job: its last step is
    recorded after its last token was streamed)."""
    values = scrape_steps(url)
    for _ in range(_SETTLE_TRIES):
        time.sleep(_SETTLE_S)
        again = scrape_steps(url)
        if again.get("steps") == values.get("steps"):
            break
        values = again
    return values


@dataclass(frozen=True)
class CalibrationJob:
    """Phase seconds, wall time and iterations of one calibration job."""

    wall_s: float
    num_steps: float
    phase_s: dict[str, float]


def run_calibration(client, metrics_url: str, vocab_size: int, num_seqs: int, prompt_len: int,
                    gen_len: int, seed: int) -> CalibrationJob:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab_size, prompt_len).tolist() for _ in range(num_seqs)]
    before = scrape_steps(metrics_url)
    start = time.perf_counter()
    client.generate_batch(prompts, max_concurrency=num_seqs, progress=False, temperature=0.0,
                          ignore_eos=True, min_tokens=gen_len, max_tokens=gen_len)
    wall = time.perf_counter() - start
    after = _scrape_after(metrics_url, before.get("steps", 0), gen_len)
    phases = {p: after.get(p, 0.0) - before.get(p, 0.0) for p in after if p != "steps"}
    return CalibrationJob(wall, after.get("steps", 0) - before.get("steps", 0), phases)


def calibration_shapes(deployment,
                       max_prompt_len: int | None = None) -> list[tuple[int, int, int]]:
    """(prompt_len, gen_len, requests) of calibration jobs A…F for this deployment (prompts of
    at most `max_prompt_len` tokens: the model's context less the generated token)."""
    num_seqs = deployment.max_num_seqs or CALIBRATION_SEQS
    budget = deployment.token_budget or LONG_PROMPT
    fill = -(-budget // MAX_PROMPT)  # prompts of the longest kind per iteration
    long_prompt = min(budget // fill, max_prompt_len or budget)
    p, g = CALIBRATION_PROMPT, CALIBRATION_GEN
    return [(p, g, 1), (p, g, num_seqs)] + [
        (long_prompt // per_step, 1, fill * per_step * PREFILL_STEPS)
        for per_step in PROMPTS_PER_STEP] + [(p, SHORT_GEN, SHORT_ROUNDS * num_seqs)]


def run_calibrations(client, metrics_url: str, deployment, vocab_size: int,
                     seed: int = 0, max_prompt_len: int | None = None) -> list[CalibrationJob]:
    """Run calibration jobs A…F once each, in order."""
    return [run_calibration(client, metrics_url, vocab_size, k, p, g, seed + i)
            for i, (p, g, k) in enumerate(calibration_shapes(deployment, max_prompt_len))]


def merge_calibrations(runs: list[list[CalibrationJob]]) -> list[CalibrationJob]:
    """Several runs of the same jobs as one (times add: a run twice as long)."""
    merged = []
    for jobs in zip(*runs):
        phases: dict[str, float] = {}
        for job in jobs:
            for name, value in job.phase_s.items():
                phases[name] = phases.get(name, 0.0) + value
        merged.append(CalibrationJob(sum(j.wall_s for j in jobs),
                                     sum(j.num_steps for j in jobs), phases))
    return merged


def fit_part_scales(jobs: list[CalibrationJob], repeats: int, phase: str, names: tuple[str, str],
                    known: StepOverheads, priced) -> StepOverheads:
    """`known` with the terms `names` of the two parts the model prices `phase` in (gemm:
    seconds per layer and the curve's scale; exchange: scales of the round trip's latency and
    per-byte parts) fitted, non-negative, to the relative errors of the jobs' measured phase.
    `priced(i, overheads)` prices job i's phase. Gauss-Newton (PART_FIT_ROUNDS rounds, exact at
    once for the GEMM, which is linear in its terms). A first term that comes out 0 falls back
    to scaling both by the totals' ratio; no measurement of the phase leaves `known` as it is."""
    measured = np.array([job.phase_s.get(phase, 0.0) / repeats for job in jobs])
    if not (measured > 0).all():
        return known
    weight = 1.0 / measured  # each job counts by its relative error
    step = 1e-3
    for _ in range(PART_FIT_ROUNDS):
        x0 = np.array([getattr(known, n) for n in names])
        c0 = np.array([priced(i, known) for i in range(len(jobs))])
        slopes = np.array([[(priced(i, replace(known, **{n: getattr(known, n) + step}))
                             - c0[i]) / step for n in names] for i in range(len(jobs))])
        if not (slopes.sum(axis=1) > 0).all():
            return known
        scales = nonnegative_lstsq(slopes * weight[:, None],
                                   (measured - c0 + slopes @ x0) * weight)
        if scales[0] <= 0:  # one factor on both, from the totals
            scales = list(x0 * measured.sum() / c0.sum())
        known = replace(known, **dict(zip(names, scales)))
    return known


def fit_overheads(jobs: list[CalibrationJob], repeats: int, spec, profile,
                  deployment, max_prompt_len: int | None = None) -> StepOverheads:
    """StepOverheads from calibration jobs A…F (`repeats` runs merged, run with the same
    `max_prompt_len`; see the module docstring)."""
    from services.coordinator.perf_model import Workload, predict
    shapes = calibration_shapes(deployment, max_prompt_len)[:len(jobs)]  # runs stored before F
    lengths = [(p, k) for p, _, k in shapes]
    seconds = [job.phase_s.get("prefill_attention", 0.0) / spec.num_layers / repeats
               for job in jobs]
    per_call, per_token, per_flop = fit_prefill_attention(lengths, seconds, spec.q_size)
    kernels = StepOverheads(prefill_attention_s_per_seq=per_call,
                            prefill_attention_s_per_token=per_token,
                            prefill_attention_s_per_flop=per_flop)

    def modelled(index: int, overheads: StepOverheads):
        p, g, k = shapes[index]
        return predict(spec, profile, Workload(p, g, k), deployment, overheads,
                       replay=True).stage2_scheduled

    for phase, names in PART_SCALES.items():
        kernels = fit_part_scales(jobs, repeats, phase, names, kernels,
                                  lambda i, o, phase=phase: modelled(i, o).components_s[phase])

    def fit_terms(known: StepOverheads, terms: tuple[str, ...], measured: list[float],
                  of_run) -> StepOverheads:
        """What `known` leaves unexplained in each job (`measured` minus `of_run` of its
        replay), against how much of each term the job holds (the replay priced with a unit
        of one term at a time): `known` with the terms, fitted non-negative."""
        base = [of_run(modelled(i, known)) for i in range(len(jobs))]
        unit = 1e-3
        columns = np.array([[(of_run(modelled(i, replace(known, **{t: unit}))) - base[i]) / unit
                             for t in terms] for i in range(len(jobs))])  # [jobs, terms]
        fitted = nonnegative_lstsq(columns, np.array(measured) - np.array(base))
        return replace(known, **dict(zip(terms, fitted)))

    kernels = fit_terms(kernels, ATTENTION_TERMS,
                        [job.phase_s.get("attention", 0.0) / repeats for job in jobs],
                        lambda run: run.components_s["attention"])
    return fit_terms(kernels, STEP_TERMS, [job.wall_s / repeats for job in jobs],
                     lambda run: run.total_time_s)
