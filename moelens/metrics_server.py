"""Prometheus plumbing every service shares: the /metrics HTTP endpoint and per-RPC histograms.

Each service builds its own `CollectorRegistry` and hands it here and to its exporter; nothing
uses prometheus_client's global default registry, so tests (and `serve all` in one process)
can hold several side by side without name clashes.

The endpoint binds 127.0.0.1 unless told otherwise, like the gRPC services: callers pass the
same `--host` they bind gRPC on (compose passes 0.0.0.0 so Prometheus can reach it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server

from moelens.errors import Unavailable

DEFAULT_METRICS_HOST = "127.0.0.1"

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
               10.0, 30.0, 60.0, 300.0, 1800.0)
"""Seconds: from a sub-millisecond per-layer exchange to a whole streamed generation."""


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `close()` stops it and frees the port."""

    port: int
    httpd: WSGIServer
    thread: threading.Thread

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def serve_metrics(port: int, registry: CollectorRegistry,
                  host: str = DEFAULT_METRICS_HOST) -> MetricsServer:
    """Serve `registry` at http://host:port/metrics on a daemon thread; port 0 picks a free one."""
    if port < 0 or port > 65535:
        raise ValueError(f"metrics port {port}: set --metrics-port to 0..65535 (0 = off)")
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise Unavailable(f"cannot serve metrics on {host}:{port} ({err.strerror}): pick another "
                          f"--metrics-port or 0 to turn metrics off") from err
    return MetricsServer(port=httpd.server_port, httpd=httpd, thread=thread)


def start_metrics_server(port: int, registry: CollectorRegistry,
                         host: str = DEFAULT_METRICS_HOST) -> int:
    """Start the endpoint for a service's `--metrics-port`; 0 means off and returns 0.

    Returns the bound port. The server lives as long as the process (a daemon thread), which
    is what a service wants; tests that need to stop it use `serve_metrics`.
    """
    if port == 0:
        return 0
    return serve_metrics(port, registry, host).port


class RpcMetrics:
    """`moelens_rpc_duration_seconds{service,method,code}`: the gRPC interceptor's observer.

    `observe` has the `moelens.grpc_server.RpcObserver` signature, so a server passes
    `RpcMetrics(registry, "coordinator").observe` as `start_server(..., observe=...)`.
    """

    def __init__(self, registry: CollectorRegistry, service: str):
        if not service:
            raise ValueError("RpcMetrics service: pass the service name, e.g. 'coordinator'")
        self.service = service
        self.duration = Histogram(
            "moelens_rpc_duration_seconds",
            "Server-side duration of gRPC calls by method and status code name "
            "(OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL, ...).",
            ["service", "method", "code"], buckets=RPC_BUCKETS, registry=registry)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.duration.labels(self.service, method, code).observe(seconds)


def start_service_metrics(port: int, host: str, service: str, exporter_factory):
    """A service's exporter and RPC observer on `--metrics-port`, or (None, None) when it is 0.

    exporter_factory(registry) builds the service's exporter (CoordinatorMetrics, ...)."""
    if not port:
        return None, None
    registry = CollectorRegistry()
    start_metrics_server(port, registry, host=host)
    return exporter_factory(registry), RpcMetrics(registry, service).observe
