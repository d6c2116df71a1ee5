"""Start the three services as local processes on loopback, and stop them again.

Each service runs as `python -m moelens_cli.main serve <role>` in its own process group, so a
Ctrl-C at the terminal reaches only the launcher, which then stops them in order (coordinator
first, so nothing sends to a service that is already gone). Ports are chosen by the services
(--port 0) and published through --port-file once they serve; logs go to one file per service.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moelens_cli.launch_options import ROLES, LaunchOptions

_POLL_S = 0.1  # start-up takes seconds (model loading, warm-up); a tenth is plenty
_SERVING = health_pb2.HealthCheckResponse.SERVING
_STDERR_TAIL_LINES = 40


class ServiceStartError(RuntimeError):
    """A service exited or did not become ready during start-up; the message has its log tail."""


@dataclass
class ServiceProcess:
    role: str
    process: subprocess.Popen
    log_path: Path
    address: str = ""

    def tail(self, num_lines: int = _STDERR_TAIL_LINES) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])


@dataclass
class LocalServices:
    """The running services; `stop()` (or leaving the `with` block) ends them all."""

    log_dir: Path
    is_log_dir_owned: bool
    """The launcher made log_dir and deletes it after a clean stop."""
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    is_stopped: bool = False

    @property
    def coordinator_address(self) -> str:
        return self.services["coordinator"].address

    @property
    def expert_address(self) -> str:
        return self.services["expert"].address

    @property
    def attention_address(self) -> str:
        return self.services["attention"].address

    def stop(self, grace_s: float = 10.0, *, keep_logs: bool = False) -> None:
        """SIGTERM every service (coordinator first), wait up to grace_s, SIGKILL stragglers."""
        if self.is_stopped:
            return
        self.is_stopped = True
        running = [s for s in reversed(list(self.services.values())) if s.process.poll() is None]
        for service in running:
            _signal_group(service.process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for service in running:
            try:
                service.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(service.process, signal.SIGKILL)
                service.process.wait()
        if self.is_log_dir_owned and not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> "LocalServices":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Logs stay after a failure so the user can read what went wrong.
        self.stop(keep_logs=exc_type is not None and exc_type is not KeyboardInterrupt)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def start_local_services(options: LaunchOptions) -> LocalServices:
    """Start attention, expert, coordinator in that order, each waited on until SERVING.

    Raises ServiceStartError (with the tail of the failing service's log) if one exits or is
    not ready within options.startup_timeout_s; the ones already started are stopped."""
    owned = options.log_dir is None
    log_dir = Path(tempfile.mkdtemp(prefix="moe-lens-")) if owned else Path(options.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    services = LocalServices(log_dir, owned)
    model = _resolve_model(options.model)
    try:
        for role in ROLES:
            flags = options.role_flags(role, model, services_addresses(services))
            service = _spawn(role, flags, options, log_dir)
            services.services[role] = service
            service.address = _wait_ready(service, options.startup_timeout_s)
    except BaseException:
        services.stop(keep_logs=True)
        raise
    return services


def services_addresses(services: LocalServices) -> dict[str, str]:
    return {role: s.address for role, s in services.services.items()}


def _resolve_model(model: str) -> str:
    """Build the default model once here, so three processes do not race to build it."""
    from moelens.default_model import resolve_model
    return str(resolve_model(model))


def _spawn(role: str, flags: list[str], options: LaunchOptions, log_dir: Path) -> ServiceProcess:
    log_path = log_dir / f"{role}.log"
    port_file = log_dir / f"{role}.port"
    port_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "moelens_cli.main", "serve", role,
               "--host", options.host if role == "coordinator" else "127.0.0.1",
               "--port", str(options.port if role == "coordinator" else 0),
               "--port-file", str(port_file), "--log-level", options.log_level, *flags]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=_child_env(),
                                   start_new_session=True)
    return ServiceProcess(role, process, log_path)


def _child_env() -> dict[str, str]:
    """The parent's environment, with this source tree importable when it is not installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _wait_ready(service: ServiceProcess, timeout_s: float) -> str:
    """The service's address once it reports SERVING on grpc.health.v1 (its port file may
    appear earlier); ServiceStartError as soon as it exits or when timeout_s passes."""
    port_file = service.log_path.with_suffix(".port")
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        _check_starting(service, deadline, timeout_s)
        time.sleep(_POLL_S)
    address = f"127.0.0.1:{int(port_file.read_text())}"
    request = health_pb2.HealthCheckRequest()
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(request, timeout=1.0).status == _SERVING:
                    return address
            except grpc.RpcError:
                pass  # not listening yet, or still starting its servicer
            _check_starting(service, deadline, timeout_s)
            time.sleep(_POLL_S)


def _check_starting(service: ServiceProcess, deadline: float, timeout_s: float) -> None:
    code = service.process.poll()
    if code is not None:
        raise ServiceStartError(f"{service.role} service exited with code {code} during "
                                f"start-up; last lines of {service.log_path}:\n{service.tail()}")
    if time.monotonic() > deadline:
        raise ServiceStartError(f"{service.role} service not SERVING after {timeout_s:g} s "
                                f"(raise --startup-timeout?); last lines of {service.log_path}:"
                                f"\n{service.tail()}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, so `kill` cleans up like Ctrl-C does
    (the services run in their own process groups and would otherwise outlive the launcher)."""
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
