"""`moe-lens serve all`: the three services as local processes, until SIGTERM / Ctrl-C.

If any service dies while serving, the others are stopped and the command exits non-zero with
the tail of that service's log.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from moelens_cli.launch_options import add_launch_arguments, options_from_args
from moelens_cli.launcher import (LocalServices, ServiceStartError, sigterm_as_interrupt,
                                  start_local_services)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="checkpoint folder (config.json + safetensors) or 'default'")
    parser.add_argument("--host", default="127.0.0.1",
                        help="coordinator bind address (0.0.0.0 to accept remote clients)")
    parser.add_argument("--port", type=int, default=50051,
                        help="coordinator port (0 = pick a free one)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="Prometheus port of the coordinator; expert +1, attention +2 "
                             "(0 = off)")
    add_launch_arguments(parser)


def _watch(services: LocalServices, stop: threading.Event, died: list[str]) -> None:
    """One thread per service blocks in wait(); the first to return ends the command."""
    def wait_for(role: str) -> None:
        services.services[role].process.wait()
        if not stop.is_set():
            died.append(role)
            stop.set()
    for role in services.services:
        threading.Thread(target=wait_for, args=(role,), daemon=True).start()


def run(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args, host=args.host, port=args.port,
                                    metrics_port=args.metrics_port)
    except ValueError as err:
        print(f"moe-lens serve all: {err}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt():  # stop what was started if killed while starting
            services = start_local_services(options)
    except ServiceStartError as err:
        print(f"moe-lens serve all: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    died: list[str] = []
    with services:
        _watch(services, stop, died)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        port = services.coordinator_address.rsplit(":", 1)[1]
        print(f"moe-lens: coordinator serving on {host}:{port} (attention "
              f"{services.attention_address}, expert {services.expert_address}); "
              f"logs in {services.log_dir}", flush=True)
        stop.wait()
        if died:
            service = services.services[died[0]]
            print(f"moe-lens serve all: the {died[0]} service exited with code "
                  f"{service.process.returncode}; last lines of {service.log_path}:\n"
                  f"{service.tail()}", file=sys.stderr)
            services.stop(keep_logs=True)
            return 1
    return 0

