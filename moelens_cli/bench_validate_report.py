"""`bench validate` results: accuracy arithmetic, the printed table, and the JSON payload."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

POINT_KEYS = ("prompt_len", "gen_len", "num_requests", "kv_cache_gb", "predicted_tokens_per_s",
              "measured_tokens_per_s", "accuracy", "bottleneck")
"""The fields of each point in the JSON payload, in the issue's order."""


def accuracy(predicted: float, measured: float) -> float:
    """1 − |predicted − measured| / measured (the paper's metric; may go below 0)."""
    if measured <= 0:
        raise ValueError(f"measured throughput must be > 0, got {measured}")
    return 1.0 - abs(predicted - measured) / measured


@dataclass
class PointResult:
    prompt_len: int
    gen_len: int
    num_requests: int
    kv_cache_gb: float
    predicted_tokens_per_s: float
    measured_tokens_per_s: float
    bottleneck: str
    kernels_only_tokens_per_s: float = 0.0
    """The same prediction without StepOverheads (the kernels of the profile alone)."""
    fluid_tokens_per_s: float = 0.0
    """The paper-style Stage 2 (constant-rate admission, kernels + overheads)."""
    wall_s: float = 0.0
    """Wall seconds of the median job run (the measured throughput's)."""
    run_walls_s: list[float] = field(default_factory=list)
    """Every job run's wall seconds (`--runs`)."""
    predicted_iterations: int = 0
    predicted_preemptions: int = 0
    measured_preemptions: int = 0
    load_average: float = 0.0
    """1-minute load average around the point (the machine is shared; 2 cores)."""
    cpu_steal_fraction: float | None = None
    """Share of the CPUs' time the host took for other work during the median run (None
    without /proc/stat): noise the model cannot price."""
    is_capacity_bound: bool = False
    """The KV cache is smaller than what the job's running requests could hold."""
    profile: dict[str, Any] = field(default_factory=dict)
    overheads: dict[str, Any] = field(default_factory=dict)
    predicted_components_s: dict[str, float] = field(default_factory=dict)
    """The model's seconds per component over the whole job."""
    measured_phases_s: dict[str, float] = field(default_factory=dict)
    """The expert service's phase timers over the job; overhead = wall − the phases; steps =
    the iterations it ran."""
    spec: dict[str, Any] = field(default_factory=dict)
    deployment: dict[str, Any] = field(default_factory=dict)
    """The perf_model ModelSpec and Deployment the point was priced with."""
    calibration_runs: list[list[dict[str, Any]]] = field(default_factory=list)
    """The calibration jobs A…F before and after the job (CalibrationJob fields): with the
    profile, spec and deployment, all a later model needs to price the point again."""

    @property
    def accuracy(self) -> float:
        return accuracy(self.predicted_tokens_per_s, self.measured_tokens_per_s)


def summary(results: list[PointResult]) -> tuple[float, float]:
    """(mean accuracy, worst accuracy)."""
    if not results:
        raise ValueError("no points to summarise")
    values = [r.accuracy for r in results]
    return statistics.fmean(values), min(values)


HEADER = (f"{'p':>4} {'g':>4} {'K':>4} {'KV MiB':>7} {'regime':>8} {'pred':>8} {'meas':>8} "
          f"{'acc':>6} {'kern.':>6} {'bottleneck':<12} {'load':>5} {'steal':>6} {'pre p/m':>8}")


def format_row(r: PointResult) -> str:
    regime = "capacity" if r.is_capacity_bound else "compute"
    kernels = accuracy(r.kernels_only_tokens_per_s, r.measured_tokens_per_s)
    return (f"{r.prompt_len:>4} {r.gen_len:>4} {r.num_requests:>4} {r.kv_cache_gb * 1024:>7.1f} "
            f"{regime:>8} {r.predicted_tokens_per_s:>8.1f} {r.measured_tokens_per_s:>8.1f} "
            f"{100 * r.accuracy:>5.1f}% {100 * kernels:>5.1f}% {r.bottleneck:<12} "
            f"{r.load_average:>5.1f} {_percent(r.cpu_steal_fraction):>6} "
            f"{r.predicted_preemptions:>3}/{r.measured_preemptions:<4}")


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def format_components(r: PointResult) -> str:
    """Where the time went, predicted/measured seconds per component (and iterations, where the
    run counted them)."""
    names = ("gemm", "prefill_attention", "attention", "exchange", "overhead")
    parts = [f"{name} {r.predicted_components_s.get(name, 0.0):.2f}/"
             f"{r.measured_phases_s.get(name, 0.0):.2f}" for name in names]
    if "steps" in r.measured_phases_s:
        parts.append(f"iterations {r.predicted_iterations}/{r.measured_phases_s['steps']:.0f}")
    return "      seconds predicted/measured: " + ", ".join(parts)


def format_summary(results: list[PointResult]) -> str:
    mean, worst = summary(results)
    kernels = [accuracy(r.kernels_only_tokens_per_s, r.measured_tokens_per_s) for r in results]
    loads = [r.load_average for r in results]
    return "\n".join([
        f"points: {len(results)}; mean accuracy {100 * mean:.1f}%, worst {100 * worst:.1f}% "
        f"(targets: mean >= 97%, worst >= 90%)",
        f"kernels only (no step overheads): mean {100 * statistics.fmean(kernels):.1f}%, "
        f"worst {100 * min(kernels):.1f}%",
        f"load average during the points: {min(loads):.1f} to {max(loads):.1f} "
        f"(2 cores; above ~2 other work shares the CPUs)"])


DIAGNOSTIC_KEYS = (
    "kernels_only_tokens_per_s", "fluid_tokens_per_s", "wall_s", "run_walls_s",
    "predicted_iterations", "predicted_preemptions", "measured_preemptions", "load_average",
    "cpu_steal_fraction",
    "is_capacity_bound", "profile", "overheads", "predicted_components_s", "measured_phases_s",
    "spec", "deployment", "calibration_runs")
"""Per-point fields of the payload's "diagnostics" list."""


def payload(results: list[PointResult]) -> dict[str, Any]:
    """The JSON document: the issue's points and summary, plus per-point diagnostics."""
    mean, worst = summary(results)
    points = [{key: getattr(r, key) for key in POINT_KEYS} for r in results]
    diagnostics = [{name: getattr(r, name) for name in DIAGNOSTIC_KEYS} for r in results]
    return {"points": points, "mean_accuracy": mean, "worst_accuracy": worst,
            "diagnostics": diagnostics}


def from_payload(document: dict[str, Any]) -> list[PointResult]:
    """The PointResults of a payload() document (its points with their diagnostics)."""
    points, diagnostics = document.get("points"), document.get("diagnostics")
    if not isinstance(points, list) or not isinstance(diagnostics, list) \
            or len(points) != len(diagnostics):
        raise ValueError("not a `bench validate --json` document: needs equally long 'points' "
                         "and 'diagnostics' lists")
    names = set(POINT_KEYS + DIAGNOSTIC_KEYS) - {"accuracy"}
    return [PointResult(**{k: v for k, v in {**p, **d}.items() if k in names})
            for p, d in zip(points, diagnostics)]
