"""`moe-lens serve coordinator`: the client API, the scheduler and the engine loop."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from moelens.errors import Unavailable
from moelens.grpc_server import start_server, wait_for_termination
from moelens.metrics_server import start_service_metrics
from moelens.service_args import (add_common_arguments, configure_logging, resolve_model,
                                  write_port_file)
from moelens.v1 import coordinator_pb2, coordinator_pb2_grpc
from services.coordinator.metrics import CoordinatorMetrics
from services.coordinator.servicer import CoordinatorServicer
from services.coordinator.state import CoordinatorOptions, build_state

log = logging.getLogger("moelens.coordinator")
MAX_WAITING_THREADS = 2048
SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--expert", required=True, help="expert service host:port")
    parser.add_argument("--attention", required=True, help="attention service host:port")
    parser.add_argument("--token-budget", type=int, default=None,
                        help="tokens per iteration (default: from the performance model)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="HardwareProfile JSON (moe-lens profile); default: assembled from "
                             "the compute services' warmup measurements")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="running requests at most")
    parser.add_argument("--max-waiting", type=int, default=4096,
                        help="waiting requests at most (beyond: RESOURCE_EXHAUSTED)")
    parser.add_argument("--pipeline", choices=["auto", "on", "off"], default="auto",
                        help="two-group pipeline overlapping CPU attention with GEMMs; auto = on "
                             "when the expert runs on an accelerator (on a CPU-only host both "
                             "share the cores and smaller groups only lower GEMM efficiency)")
    parser.add_argument("--no-pipeline", dest="pipeline", action="store_const", const="off",
                        help="same as --pipeline off")


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    options = CoordinatorOptions(model_dir=resolve_model(args.model), expert_address=args.expert,
                                 attention_address=args.attention, token_budget=args.token_budget,
                                 profile_path=args.profile,
                                 max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                                 pipeline=args.pipeline)
    metrics, observe = start_service_metrics(args.metrics_port, args.host, "coordinator",
                                             CoordinatorMetrics)
    holder: dict = {}
    # every live Generate stream holds a handler thread: room for all running and waiting
    # requests (the scheduler's bounds) plus control calls
    workers = args.max_num_seqs + min(args.max_waiting, MAX_WAITING_THREADS) + 16
    handle = start_server(lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(
        holder.setdefault("servicer", _LateServicer()), s), [SERVICE_NAME], args.host, args.port,
        max_workers=workers, observe=observe)
    write_port_file(args.port_file, handle.port)
    state = build_state(options, metrics)
    holder["servicer"].bind(CoordinatorServicer(state))
    state.engine.start()
    handle.set_serving(True)
    log.info("coordinator on %s:%d (expert %s, attention %s)", args.host, handle.port,
             args.expert, args.attention)
    wait_for_termination(handle, on_stop=state.engine.shutdown)
    return 0


class _LateServicer(coordinator_pb2_grpc.CoordinatorServicer):
    """Answers UNAVAILABLE until the compute services are up, then delegates.

    The server binds its port first (so health reports NOT_SERVING while the compute services
    warm up, as grpc.health.v1 clients expect) and gets its real servicer afterwards."""

    def __init__(self):
        self._target = None

    def bind(self, target: CoordinatorServicer) -> None:
        self._target = target

    def _get(self):
        if self._target is None:
            raise Unavailable("coordinator is starting: compute services not ready yet")
        return self._target

    def Generate(self, request, context):
        yield from self._get().Generate(request, context)

    def Abort(self, request, context):
        return self._get().Abort(request, context)

    def GetModelInfo(self, request, context):
        return self._get().GetModelInfo(request, context)

    def GetServerInfo(self, request, context):
        return self._get().GetServerInfo(request, context)
