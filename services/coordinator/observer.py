"""Turns engine events into stats objects, a live throughput figure and the model's prediction.

The engine calls on_step / on_finished; this class builds StepStats-derived figures and
RequestStats and hands them to the metrics exporter (if any). No metric is touched elsewhere.
"""

from __future__ import annotations

import collections
import threading
import time

from moelens.stats import PredictionStats, RequestStats, StepStats
from services.coordinator.lens import LiveLens
from services.coordinator.request import FINISH_REASON, Request

WINDOW_S = 30.0  # measured throughput is averaged over this window


class StatsObserver:
    def __init__(self, lens: LiveLens, metrics=None):
        self.lens, self.metrics = lens, metrics
        self._steps: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.live_pairs = lambda: []  # (prompt_len, max_tokens) of live requests; set by the owner

    # Engine hooks ------------------------------------------------------------------------------
    def on_step(self, stats: StepStats) -> None:
        now = time.monotonic()
        with self._lock:
            self._steps.append((now, stats.num_tokens))
            while self._steps and self._steps[0][0] < now - WINDOW_S:
                self._steps.popleft()
        self.lens.refresh(self.live_pairs())
        if self.metrics:
            self.metrics.observe_step(stats)
            self.metrics.set_queue(stats.num_running, stats.num_waiting)
            self.metrics.observe_prediction(self.prediction())

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

    def prediction(self) -> PredictionStats:
        return PredictionStats(predicted_tokens_per_s=self.lens.predicted_tokens_per_s,
                               measured_tokens_per_s=self.measured_tokens_per_s(),
                               bottleneck=self.lens.bottleneck)


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
