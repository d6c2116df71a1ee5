"""Turns engine events into stats objects, a live throughput figure and the model's prediction.

The engine calls on_step / on_finished; this class builds StepStats-derived figures and
RequestStats and hands them to the metrics exporter (if any). No metric is touched elsewhere.
"""

from __future__ import annotations

import collections
import threading
import time

from moelens.config import ModelConfig
from moelens.stats import PredictionStats, RequestStats, StepStats
from services.coordinator.request import FINISH_REASON, Request

WINDOW_S = 30.0  # measured throughput is averaged over this window


class StatsObserver:
    def __init__(self, model: ModelConfig, expert_info, attention_info, metrics=None):
        self.model, self.expert_info, self.attention_info = model, expert_info, attention_info
        self.metrics = metrics
        self._steps: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._last_prediction = PredictionStats(0.0, 0.0, "")

    # Engine hooks ------------------------------------------------------------------------------
    def on_step(self, stats: StepStats) -> None:
        now = time.monotonic()
        with self._lock:
            self._steps.append((now, stats.num_tokens))
            while self._steps and self._steps[0][0] < now - WINDOW_S:
                self._steps.popleft()
        if self.metrics:
            self.metrics.observe_step(stats)
            self.metrics.set_queue(stats.num_running, stats.num_waiting)

    def on_finished(self, request: Request) -> None:
        if self.metrics:
            self.metrics.observe_request(request_stats(request))

    # Figures -----------------------------------------------------------------------------------
    def measured_tokens_per_s(self) -> float:
        with self._lock:
            if len(self._steps) < 2:
                return 0.0
            span = self._steps[-1][0] - self._steps[0][0]
            return sum(n for _, n in list(self._steps)[1:]) / span if span > 0 else 0.0

    def token_budget(self) -> int:
        """Tokens per iteration: where the GEMM line's fixed cost falls to 5% of the step
        (beyond it, more tokens per step buy little), within the expert's workspace."""
        line = self.expert_info.layer_gemm
        if line.slope_s <= 0:
            return 2048
        n = int(line.intercept_s / (0.05 * line.slope_s))
        return max(256, min(n, 8192))

    def prediction(self) -> PredictionStats:
        self._last_prediction = PredictionStats(
            predicted_tokens_per_s=self._last_prediction.predicted_tokens_per_s,
            measured_tokens_per_s=self.measured_tokens_per_s(),
            bottleneck=self._last_prediction.bottleneck)
        return self._last_prediction


def request_stats(r: Request) -> RequestStats:
    end = time.monotonic()
    times = r.token_times_s
    return RequestStats(
        finish_reason=FINISH_REASON.get(r.status, "abort"), num_prompt_tokens=len(r.prompt_ids),
        num_generation_tokens=len(r.output_ids),
        queue_s=(r.first_scheduled_s or end) - r.arrival_s,
        ttft_s=times[0] - r.arrival_s if times else 0.0, e2e_s=end - r.arrival_s,
        inter_token_s=[b - a for a, b in zip(times, times[1:])],
        num_preemptions=r.num_preemptions)
