"""The job's step timings, read from the coordinator's Prometheus endpoint.

The engine reports each iteration's phases (GEMM, attention, exchange, weight wait, ...) to its
exporter; scraping /metrics before and after a job and subtracting gives where that job's time
went, without any API beyond the one Prometheus already reads.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass, field

STEP_SERIES = ("moelens_step_duration_seconds", "moelens_step_phase_seconds",
               "moelens_prompt_tokens_total", "moelens_generation_tokens_total",
               "moelens_num_preemptions_total", "moelens_weight_bytes_streamed_total",
               "moelens_pipeline_overlap_seconds_total")
_SAMPLE = re.compile(r'^(\w+)(?:\{([^}]*)\})?\s+(\S+)$')


def parse_step_metrics(text: str) -> dict[str, float]:
    """The step-time series of a Prometheus text page as {"name{labels}": value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or not match.group(1).startswith(STEP_SERIES):
            continue
        name, labels, value = match.groups()
        if name.endswith("_bucket") or name.endswith("_created"):
            continue
        values[f"{name}{{{labels}}}" if labels else name] = float(value)
    return values


def scrape_step_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # loopback only
        return parse_step_metrics(reply.read().decode())


@dataclass
class StepSummary:
    """Where the job's iterations spent their time (differences of two scrapes)."""

    num_steps: int
    step_s: float
    phase_s: dict[str, float] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    num_decode_tokens: int = 0
    num_preemptions: int = 0
    weight_bytes_streamed: int = 0
    overlap_s: float = 0.0


def summarize_steps(before: dict[str, float], after: dict[str, float]) -> StepSummary:
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    phases = {}
    for key in after:
        found = re.match(r'moelens_step_phase_seconds_sum\{phase="(\w+)"\}', key)
        if found:
            phases[found.group(1)] = delta(key)
    return StepSummary(
        num_steps=int(delta("moelens_step_duration_seconds_count")),
        step_s=delta("moelens_step_duration_seconds_sum"), phase_s=phases,
        num_prompt_tokens=int(delta("moelens_prompt_tokens_total")),
        num_decode_tokens=int(delta("moelens_generation_tokens_total")),
        num_preemptions=int(delta("moelens_num_preemptions_total")),
        weight_bytes_streamed=int(delta("moelens_weight_bytes_streamed_total")),
        overlap_s=delta("moelens_pipeline_overlap_seconds_total"))


def format_steps(summary: StepSummary, elapsed_s: float) -> str:
    """One line per phase, as seconds and as a share of the job's wall time."""
    lines = [f"Steps: {summary.num_steps} iterations, {summary.step_s:.2f} s in Step RPCs "
             f"({100 * summary.step_s / elapsed_s:.1f}% of wall), "
             f"{summary.num_prompt_tokens} prefill + {summary.num_decode_tokens} decode tokens, "
             f"{summary.num_preemptions} preemptions"]
    for phase, seconds in sorted(summary.phase_s.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {phase:<18} {seconds:8.2f} s  {100 * seconds / elapsed_s:5.1f}%")
    if summary.overlap_s:
        lines.append(f"  {'(pipeline overlap)':<18} {summary.overlap_s:8.2f} s")
    return "\n".join(lines)
