"""Deployment files: compose.yaml, Prometheus config, Grafana provisioning and dashboard, Dockerfile.

The system tools (docker-compose, promtool) are checked by the tools themselves; when one is
missing the test fails and says how to install it rather than skipping.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moelens.metrics_server import RpcMetrics
from moelens.stats import PredictionStats, RequestStats, StepStats, StepTimings
from services.attention_cpu.metrics import AttentionMetrics
from services.coordinator.metrics import CoordinatorMetrics
from services.expert_gpu.metrics import ExpertMetrics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
GRAFANA = ROOT / "deploy/grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
MOELENS_SERVICES = {"coordinator": "coordinator", "expert_gpu": "expert",
                    "attention_cpu": "attention"}
PROMETHEUS_SERIES = {"up"}  # written by Prometheus itself for every target


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `bash scripts/install_system_deps.sh` "
                    f"(Debian packages prometheus and docker-compose)")
    return path


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "MOELENS_"))}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


@functools.lru_cache(maxsize=None)
def compose_config(*profile_args: str) -> dict:
    """`docker-compose config` validates the file (as `config -q` does) and prints it resolved."""
    tool = require_tool("docker-compose")
    return yaml.safe_load(run_tool(tool, "-f", str(COMPOSE), *profile_args, "config").stdout)


def flags(command: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


# compose.yaml -----------------------------------------------------------------------------------

def test_compose_is_valid_for_both_profiles():
    for profile_args in ((), ("--profile", "gpu")):
        services = compose_config(*profile_args)["services"]
        assert {"coordinator", "expert_gpu", "expert_cpu", "attention_cpu", "prometheus",
                "grafana"} <= set(services)


def test_compose_default_profile_is_cpu():
    env_file = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines()
                    if line and not line.startswith("#"))
    assert env_file["COMPOSE_PROFILES"] == "cpu"


def test_compose_expert_variants():
    services = compose_config()["services"]
    gpu, cpu = services["expert_gpu"], services["expert_cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in cpu
    assert "expert_gpu" in cpu["networks"]["default"]["aliases"]  # coordinator finds either
    assert gpu["command"] == cpu["command"]
    for expert in (gpu, cpu):
        assert expert["ipc"] == "service:attention_cpu"
        assert expert["depends_on"]["attention_cpu"]["condition"] == "service_healthy"
        assert flags(expert["command"])["transport"] == "shm"
        assert flags(expert["command"])["device"] == "auto"
    attention = services["attention_cpu"]
    assert attention["ipc"] == "shareable" and attention["shm_size"]


def test_compose_service_commands_and_healthchecks():
    services = compose_config()["services"]
    ports = {}
    for name, role in MOELENS_SERVICES.items():
        service = services[name]
        assert service["command"][:3] == ["moe-lens", "serve", role]
        args = flags(service["command"])
        assert args["host"] == "0.0.0.0" and args["model"] == "default"
        ports[name] = (args["port"], args["metrics-port"])
        health = " ".join(service["healthcheck"]["test"])
        assert "grpc_health.v1" in health and f"127.0.0.1:{args['port']}" in health
        assert "moelens-cache:/cache:rw" in service["volumes"]
        assert any(v.endswith(":/models:ro") for v in service["volumes"])
        assert service["environment"]["XDG_CACHE_HOME"] == "/cache"
    coordinator = flags(services["coordinator"]["command"])
    assert coordinator["expert"] == f"expert_gpu:{ports['expert_gpu'][0]}"
    assert coordinator["attention"] == f"attention_cpu:{ports['attention_cpu'][0]}"
    assert flags(services["expert_gpu"]["command"])["attention"] == \
        f"attention_cpu:{ports['attention_cpu'][0]}"
    attention = flags(services["attention_cpu"]["command"])
    assert {"kv-cache-gb", "block-size", "transport"} <= set(attention)
    assert scrape_targets() == {name: f"{name}:{metrics}" for name, (_, metrics) in ports.items()}


def test_compose_mounts_the_provisioning_files():
    services = compose_config()["services"]
    grafana_mounts = dict(v.rsplit(":", 2)[:2] for v in services["grafana"]["volumes"]
                          if v.startswith("/"))
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/moelens.yaml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert grafana_mounts[str(GRAFANA / "provisioning")] == "/etc/grafana/provisioning"
    assert grafana_mounts[str(GRAFANA / "dashboards")] == dashboards_path
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(dashboards_path)
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()
    prometheus_mounts = services["prometheus"]["volumes"]
    assert f"{PROMETHEUS_CONFIG}:/etc/prometheus/prometheus.yml:ro" in prometheus_mounts


# Prometheus ------------------------------------------------------------------------------------

def scrape_targets() -> dict[str, str]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            (target,) = static["targets"]
            targets[static["labels"]["service"]] = target
            assert job["job_name"] == static["labels"]["service"]
            assert job["honor_labels"] is True
    return targets


def test_promtool_accepts_prometheus_config():
    promtool = require_tool("promtool")
    result = run_tool(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert "SUCCESS" in result.stdout + result.stderr


# Grafana ---------------------------------------------------------------------------------------

def provisioned_datasource_uid() -> str:
    config = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    (source,) = config["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    return source["uid"]


def dashboard_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.extend([panel] if panel["type"] != "row" else panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in DASHBOARDS:
        for panel in dashboard_panels(json.loads(path.read_text())):
            exprs.extend(target["expr"] for target in panel["targets"])
    return exprs


def test_dashboard_structure():
    assert DASHBOARDS, "no dashboard JSON in deploy/grafana/dashboards"
    uid = provisioned_datasource_uid()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["service"]["datasource"]["uid"] == uid
        assert variables["service"]["includeAll"] and variables["service"]["allValue"] == ".*"
        panels = dashboard_panels(dashboard)
        assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
        for panel in panels:
            assert panel["targets"], f"{path.name}: panel {panel['title']!r} has no query"
            assert panel["datasource"]["uid"] == uid
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid
                assert "$service" in target["expr"], f"{panel['title']!r} ignores $service"
        titles = " | ".join(p["title"].lower() for p in panels)
        for wanted in ("predicted vs measured", "bottleneck", "iteration time", "kv cache",
                       "running / waiting", "time to first token", "inter-token",
                       "end-to-end", "weight streaming", "rpc errors"):
            assert wanted in titles, f"{path.name}: no panel about {wanted!r}"
    exprs = " ".join(dashboard_exprs())
    assert "histogram_quantile" in exprs and 'code!="OK"' in exprs


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression (identifiers that are not functions or keywords)."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = re.findall(r"(?<![\w.$:])([a-zA-Z_:][\w:]*)(\s*\()?", expr)
    return {name for name, call in found if not call and name.lower() not in PROMQL_WORDS}


def exported_series() -> set[str]:
    """Every sample name the four exporters expose once fed one of each stats object."""
    registry = CollectorRegistry()
    coordinator = CoordinatorMetrics(registry)
    timings = StepTimings(total_s=0.1, gemm_s=0.05, weight_bytes_streamed=10)
    coordinator.observe_step(StepStats(1, 8, 2, 3, 0.1, timings, 2, 1, 5, 10, 0, 64))
    coordinator.observe_request(RequestStats("stop", 8, 3, 0.1, 0.2, 0.5, [0.1, 0.2]))
    coordinator.observe_prediction(PredictionStats(100.0, 90.0, "io"))
    coordinator.observe_rejected("queue_full")
    expert = ExpertMetrics(registry)
    expert.observe_step(timings, 10)
    expert.set_layout(1, 1, 1 << 30, 2 << 30)
    expert.set_profile(1e10, 1e-5, 1e-3)
    attention = AttentionMetrics(registry)
    attention.observe_layer(0.001, 4, 1024)
    attention.set_capacity(10, 5, 16)
    attention.set_kernel("avx2", False, 2)
    RpcMetrics(registry, "coordinator").observe("Generate", "INTERNAL", 0.1)
    text = generate_latest(registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_metrics_exist_in_exporters():
    exported = exported_series() | PROMETHEUS_SERIES
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert "moelens_step_phase_seconds_sum" in used  # the parser finds names at all
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries series no exporter registers: {missing}"


def test_metric_name_parser():
    expr = ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{service=~"$service"}'
            '[$__rate_interval]))) / on() group_left() clamp_min(max(b), 1e-9) + up')
    assert metric_names(expr) == {"a_bucket", "b", "up"}


def test_dashboard_queries_parse_as_promql(tmp_path):
    """promtool parses every query (as a recording rule) once Grafana's variables are filled."""
    promtool = require_tool("promtool")
    rules = [{"record": f"moelens:dashboard_query_{i}",
              "expr": e.replace("$__rate_interval", "1m").replace("$service", ".*")}
             for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_tool(promtool, "check", "rules", str(path))


# Dockerfile -----------------------------------------------------------------------------------

def test_dockerfile_installs_like_the_makefile():
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    torch_pin = re.search(r"^TORCH_PIN := (\S+)", (ROOT / "Makefile").read_text(), re.M)[1]
    assert f"ARG TORCH_PIN={torch_pin}" in dockerfile
    assert "ARG TORCH_INDEX_URL=" in dockerfile and "g++" in dockerfile
    assert dockerfile.index('"$TORCH_PIN"') < dockerfile.index("pip install -r")
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for name in source.split():
            assert (ROOT / name).exists(), f"Dockerfile copies {name}, which does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
