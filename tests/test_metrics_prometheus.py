"""A real Prometheus (Debian's binary) scrapes the three running services during a small job.

Checks what a dashboard user would see: every target up, token throughput, KV usage, the
performance model's series, the iteration time split and per-RPC durations, all read back
through Prometheus' HTTP query API.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from moelens.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from moelens_cli.bench_common import free_port_run
from services_fixture import running_services
from test_deploy import require_tool

SERVICES = ("coordinator", "expert_gpu", "attention_cpu")  # metrics port offsets 0, +1, +2
NUM_REQUESTS = 6
NUM_TOKENS = 48
SCRAPE_INTERVAL = "250ms"  # the tiny model finishes a job in seconds: scrape often
QUERY_DEADLINE_S = 20.0
MIN_JOB_S = 2.0  # jobs repeat at least this long (8 scrapes), however fast the machine is

CHECKS = {
    "every target up": 'count(up{job=~"coordinator|expert_gpu|attention_cpu"} == 1) == 3',
    "throughput": "sum(rate(moelens_prompt_tokens_total[1m])) + "
                  "sum(rate(moelens_generation_tokens_total[1m])) > 0",
    "generated tokens": "sum(increase(moelens_generation_tokens_total[5m])) > 0",
    "KV usage": 'max_over_time(moelens_kv_cache_usage_perc{service="coordinator"}[5m]) > 0',
    "KV pool": 'moelens_attention_kv_num_blocks{service="attention_cpu"} > 0',
    "bottleneck series": "count(moelens_bottleneck) == 5",
    "iteration split": 'sum(increase(moelens_step_phase_seconds_sum{phase="gemm"}[5m])) > 0',
    "expert steps": "sum(increase(moelens_expert_tokens_total[5m])) > 0",
    "attention layers": "sum(increase(moelens_attention_layer_seconds_count[5m])) > 0",
    "rpc durations": "count(count by (service) (moelens_rpc_duration_seconds_count)) == 3",
}
PREDICTION_CHECKS = {
    "predicted": 'max_over_time(moelens_predicted_tokens_per_second{service="coordinator"}'
                 "[5m]) > 0",
    "measured": "max_over_time(moelens_measured_tokens_per_second[5m]) > 0",
    "a bottleneck named": "max_over_time((sum(moelens_bottleneck) == 1)[5m:1s])",
}


def write_prometheus_config(path: Path, metrics_base: int) -> None:
    """Like deploy/prometheus/prometheus.yml, with the local processes' loopback ports."""
    jobs = [{"job_name": name, "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{metrics_base + i}"],
                                 "labels": {"service": name}}]}
            for i, name in enumerate(SERVICES)]
    config = {"global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
              "scrape_configs": jobs}
    path.write_text(yaml.safe_dump(config))


class Prometheus:
    """The prometheus binary on a free loopback port with its own config and storage."""

    def __init__(self, tmp_path: Path, metrics_base: int):
        binary = require_tool("prometheus")
        config = tmp_path / "prometheus.yml"
        write_prometheus_config(config, metrics_base)
        self.port = free_port_run(1)
        self.log_path = tmp_path / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready:\n{self.log_path.read_text()[-3000:]}")

    def query(self, promql: str) -> list[dict]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def generate(address: str, prompt: list[int]) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        request = coordinator_pb2.GenerateRequest(
            token_ids=coordinator_pb2.TokenIds(ids=prompt),
            sampling=common_pb2.SamplingParams(max_tokens=NUM_TOKENS, temperature=0,
                                               ignore_eos=True))
        for _ in stub.Generate(request, timeout=300):
            pass


def run_job(address: str) -> None:
    """NUM_REQUESTS concurrent streams, so steps batch several sequences."""
    prompts = [[(5 * i + 11 * r) % 50 + 1 for i in range(12 + 7 * r)] for r in range(NUM_REQUESTS)]
    threads = [threading.Thread(target=generate, args=(address, p)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_jobs(address: str) -> None:
    """run_job again and again for MIN_JOB_S: a counter's increase() needs two scrapes that
    straddle its change, and a gauge like KV usage is non-zero only while a job runs (one job
    can finish inside a single scrape interval on a fast machine)."""
    deadline = time.monotonic() + MIN_JOB_S
    while True:
        run_job(address)
        if time.monotonic() > deadline:
            return


def unanswered(prometheus: Prometheus, checks: dict[str, str]) -> list[str]:
    """Names of the checks whose query is still empty once the deadline passes.

    Polled because the job's last samples reach Prometheus only with its next scrapes.
    """
    deadline = time.monotonic() + QUERY_DEADLINE_S
    pending = dict(checks)
    while pending:
        pending = {name: q for name, q in pending.items() if not prometheus.query(q)}
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return sorted(pending)


@pytest.fixture(scope="module")
def scraped(tiny_checkpoints, tmp_path_factory):
    """Prometheus scraping the three services, after a job ran through them (still running)."""
    metrics_base = free_port_run(len(SERVICES))
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), metrics_base)
    try:
        prometheus.wait_ready()
        with running_services(tiny_checkpoints["mixtral"], metrics_port=metrics_base) as services:
            # every target scraped once before the job, so counters are seen from their start
            assert not unanswered(prometheus, {"up": CHECKS["every target up"]})
            run_jobs(services.coordinator_address)
            yield prometheus
    finally:
        prometheus.stop()


@pytest.mark.slow
def test_prometheus_scrapes_running_services(scraped):
    missing = unanswered(scraped, CHECKS)
    assert not missing, f"Prometheus has no value for: {missing}"


@pytest.mark.slow
def test_prometheus_sees_the_prediction(scraped):
    missing = unanswered(scraped, PREDICTION_CHECKS)
    assert not missing, (
        f"Prometheus has no value for: {missing}. These come only from "
        f"CoordinatorMetrics.observe_prediction, which the coordinator must call as it runs "
        f"(e.g. from StatsObserver.on_step with StatsObserver.prediction()).")
