"""What every MoE-Lens gRPC server shares: status mapping, health, reflection, graceful stop.

Servicers stay thin: they raise the exceptions of moelens.errors (or ValueError) and the one
interceptor here turns them into status codes, so no servicer builds a status by hand.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moelens.compute_loop import ComputeLoop
from moelens.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 30  # activations of a large step travel in one message on the grpc transport
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

_STATUS_OF = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (NotFound, grpc.StatusCode.NOT_FOUND),
]

RpcObserver = Callable[[str, str, float], None]
"""(method, status code name, seconds) -> None; the metrics exporter's hook."""


def status_for(err: BaseException) -> grpc.StatusCode:
    for kind, code in _STATUS_OF:
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INTERNAL


class StatusInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to status codes and reports every call's duration and code."""

    def __init__(self, observe: RpcObserver | None = None):
        self.observe = observe

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method))
        return handler

    def _finish(self, method: str, start: float, code: grpc.StatusCode) -> None:
        if self.observe:
            self.observe(method, code.name, time.perf_counter() - start)

    def _fail(self, context, method: str, start: float, err: Exception):
        code = status_for(err)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method)
        self._finish(method, start, code)
        context.abort(code, str(err) or type(err).__name__)

    def _wrap_unary(self, fn, method: str):
        def wrapped(request, context):
            start = time.perf_counter()
            try:
                response = fn(request, context)
            except Exception as err:  # noqa: BLE001 - mapped to a status, never swallowed
                if isinstance(err, grpc.RpcError) or context.code() is not None:
                    raise
                self._fail(context, method, start, err)
            self._finish(method, start, context.code() or grpc.StatusCode.OK)
            return response
        return wrapped

    def _wrap_stream(self, fn, method: str):
        def wrapped(request, context):
            start = time.perf_counter()
            try:
                yield from fn(request, context)
            except Exception as err:  # noqa: BLE001
                if isinstance(err, grpc.RpcError) or context.code() is not None:
                    raise
                self._fail(context, method, start, err)
            self._finish(method, start, context.code() or grpc.StatusCode.OK)
        return wrapped


@dataclass
class ServerHandle:
    server: grpc.Server
    health: health.HealthServicer
    port: int

    def set_serving(self, is_serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if is_serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set("", status)

    def stop(self, grace_s: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def start_server(register: Callable[[grpc.Server], None], service_names: Iterable[str],
                 host: str, port: int, *, max_workers: int = 32,
                 observe: RpcObserver | None = None) -> ServerHandle:
    """Start a server with health (NOT_SERVING until told) and reflection; port 0 picks one.

    A streaming RPC holds a worker thread for its whole life, so `max_workers` bounds the
    concurrent calls; beyond it gRPC answers RESOURCE_EXHAUSTED itself."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=[StatusInterceptor(observe)], options=CHANNEL_OPTIONS,
                         maximum_concurrent_rpcs=max_workers)
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise Unavailable(f"cannot bind {host}:{port}")
    server.start()
    handle = ServerHandle(server, health_servicer, bound)
    handle.set_serving(False)
    return handle


def wait_for_termination(handle: ServerHandle, on_stop: Callable[[], None] | None = None,
                         compute: ComputeLoop | None = None) -> None:
    """Block until SIGTERM/SIGINT, serving `compute`'s calls meanwhile, then stop gracefully
    (no polling loop)."""
    stop = threading.Event()

    def on_signal(*_) -> None:
        stop.set()
        if compute:
            compute.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if compute:
        compute.run()
    else:
        stop.wait()
    handle.set_serving(False)
    if on_stop:
        on_stop()
    handle.stop()


def wait_until_serving(address: str, timeout_s: float) -> None:
    """Block until the server at `address` reports SERVING on grpc.health.v1."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0,
                                   wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"{address} not SERVING after {timeout_s:.0f} s")
            time.sleep(0.1)
