"""`moe-lens serve expert`: weights and every GEMM, driving the layers of each step."""

from __future__ import annotations

import argparse
import logging

import torch

from moelens import panel_gemm
from moelens.compute_loop import PIN_MODES, ComputeLoop, pin_compute_team
from moelens.grpc_server import start_server, wait_for_termination
from moelens.metrics_server import start_service_metrics
from moelens.service_args import (add_common_arguments, configure_logging, default_num_threads,
                                  resolve_model, write_port_file)
from moelens.v1 import expert_pb2, expert_pb2_grpc
from services.expert_gpu.metrics import ExpertMetrics
from services.expert_gpu.config import TRANSPORTS, ExpertConfig, resolve_device, resolve_dtype
from services.expert_gpu.servicer import ExpertServicer
from services.expert_gpu.worker import ExpertWorker

log = logging.getLogger("moelens.expert")
SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--attention", required=True, help="attention service host:port")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--device-memory-gb", type=float, default=None,
                        help="device budget for weights + workspace (default: all resident)")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "float16", "bfloat16"],
                        help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads (default: all cores of this process)")
    parser.add_argument("--transport", default="shm", choices=TRANSPORTS)
    parser.add_argument("--max-num-tokens", type=int, default=8192,
                        help="most tokens per step (sizes the workspace reservation)")
    parser.add_argument("--pin-threads", default="auto", choices=PIN_MODES,
                        help="pin the compute threads one per CPU (auto: on the cpu device, "
                             "when they span every CPU of this process)")
    parser.add_argument("--cpu-gemm", default="auto", choices=panel_gemm.MODES,
                        help="CPU device GEMMs: panels (weights packed once at load; prefill "
                             "attention on the same kernel), torch (F.linear, SDPA), auto "
                             "(panels on AVX2 CPUs)")


def config_from_args(args: argparse.Namespace) -> ExpertConfig:
    device = resolve_device(args.device)
    return ExpertConfig(attention_address=args.attention, device=device,
                        dtype=resolve_dtype(args.dtype, device),
                        device_memory_gb=args.device_memory_gb,
                        num_threads=args.num_threads or default_num_threads(),
                        pin_threads=args.pin_threads,
                        transport=args.transport, max_num_tokens=args.max_num_tokens,
                        cpu_gemm=args.cpu_gemm)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    config = config_from_args(args)
    torch.set_num_threads(config.num_threads)
    compute = ComputeLoop()  # this thread: loading, warmup and every step (moelens.compute_loop)
    pinned = pin_compute_team(panel_gemm.pin_openmp_team, config.num_threads,
                              config.pin_mode)  # before any other thread starts
    worker = ExpertWorker(resolve_model(args.model), config)
    metrics, observe = start_service_metrics(args.metrics_port, args.host, "expert_gpu",
                                             ExpertMetrics)
    servicer = ExpertServicer(worker, compute, metrics)
    handle = start_server(lambda s: expert_pb2_grpc.add_ExpertServiceServicer_to_server(
        servicer, s), [SERVICE_NAME], args.host, args.port, observe=observe)
    info = worker.warmup()
    if metrics:
        metrics.set_layout(info.num_resident_layers, info.num_streamed_layers,
                           info.device_memory_budget_bytes, info.weight_bytes_total)
        metrics.set_profile(info.h2d_bytes_per_s, info.layer_gemm.slope_s,
                            info.layer_gemm.intercept_s)
    handle.set_serving(True)
    write_port_file(args.port_file, handle.port)
    log.info("expert service on %s:%d: %s %s (%s GEMMs, %d threads pinned to CPUs %s), %d "
             "resident + %d streamed layers, h2d %.1f GB/s, layer GEMM %.3g s + %.3g s/token",
             args.host, handle.port, config.device, config.dtype,
             "panel" if worker.panels else "torch", config.num_threads, pinned,
             info.num_resident_layers, info.num_streamed_layers,
             info.h2d_bytes_per_s / 1e9, info.layer_gemm.intercept_s, info.layer_gemm.slope_s)
    wait_for_termination(handle, on_stop=worker.close, compute=compute)
    return 0
