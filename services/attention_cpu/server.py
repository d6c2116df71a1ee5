"""`moe-lens serve attention`: the KV cache and CPU attention as a gRPC service."""

from __future__ import annotations

import argparse
import logging

from moelens import shm_ring
from moelens.compute_loop import PIN_MODES, ComputeLoop, pin_compute_team
from moelens.config import load_config
from moelens.exchange import NUM_SLOTS, RING_DEPTH, ring_message_bytes, shm_slot_bytes
from moelens.grpc_server import start_server, wait_for_termination
from moelens.metrics_server import start_service_metrics
from moelens.service_args import (add_common_arguments, configure_logging, default_num_threads,
                                  resolve_model, write_port_file)
from moelens.shm import ShmArena, align_up
from moelens.v1 import attention_pb2, attention_pb2_grpc
from services.attention_cpu.metrics import AttentionMetrics
from services.attention_cpu.config import KV_DTYPES, TRANSPORTS, AttentionConfig
from services.attention_cpu.engine import AttentionEngine
from services.attention_cpu.servicer import AttentionServicer

log = logging.getLogger("moelens.attention")
SERVICE_NAME = attention_pb2.DESCRIPTOR.services_by_name["AttentionService"].full_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--kv-cache-gb", type=float, default=2.0,
                        help="host memory for the KV pool, GiB")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--kv-dtype", default="float32", choices=KV_DTYPES)
    parser.add_argument("--num-threads", type=int, default=None,
                        help="attention kernel threads (default: all cores of this process)")
    parser.add_argument("--pin-threads", default="auto", choices=PIN_MODES,
                        help="pin the kernel threads one per CPU (auto: when they span every "
                             "CPU of this process)")
    parser.add_argument("--transport", default="shm", choices=TRANSPORTS,
                        help="activation transport offered to the expert service")
    parser.add_argument("--max-num-tokens", type=int, default=8192,
                        help="most new tokens per step (sizes shared-memory slots)")


def config_from_args(args: argparse.Namespace) -> AttentionConfig:
    return AttentionConfig(kv_cache_gb=args.kv_cache_gb, block_size=args.block_size,
                           kv_dtype=args.kv_dtype,
                           num_threads=args.num_threads or default_num_threads(),
                           pin_threads=args.pin_threads, transport=args.transport,
                           max_num_tokens=args.max_num_tokens)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    config = config_from_args(args)
    model = load_config(resolve_model(args.model))
    compute = ComputeLoop()  # this thread: the pool, warmup and every layer (moelens.compute_loop)
    engine = AttentionEngine(model, config)
    pinned = pin_compute_team(engine.kernel.pin_openmp_team, config.num_threads,
                              config.pin_threads)  # before any other thread starts
    arena = ring_arena = None
    if config.transport == "shm":
        arena = ShmArena.create(NUM_SLOTS, align_up(shm_slot_bytes(
            config.max_num_tokens, model.q_size, model.kv_size)))
        if shm_ring.is_supported():
            message = ring_message_bytes(config.max_num_tokens, engine.num_blocks)
            ring_arena = ShmArena.create(2, shm_ring.ring_slot_bytes(message, RING_DEPTH))
    metrics, observe = start_service_metrics(args.metrics_port, args.host, "attention_cpu",
                                             AttentionMetrics)
    if metrics:
        metrics.set_kernel(engine.kernel.backend(), not engine.kernel.is_native(),
                           config.num_threads)
    servicer = AttentionServicer(engine, arena, compute, metrics, ring_arena)
    handle = start_server(lambda s: attention_pb2_grpc.add_AttentionServiceServicer_to_server(
        servicer, s), [SERVICE_NAME], args.host, args.port, observe=observe)
    handle.set_serving(True)
    write_port_file(args.port_file, handle.port)
    log.info("attention service on %s:%d: %d blocks x %d tokens (%.2f GiB %s), kernel %s, "
             "%d threads (pinned to CPUs %s), transport %s", args.host, handle.port,
             engine.num_blocks, config.block_size, engine.pool_bytes / 2**30, config.kv_dtype,
             engine.kernel.backend(), config.num_threads, pinned, config.transport)

    def close_segments() -> None:
        for segment in (arena, ring_arena):
            if segment is not None:
                segment.close()

    wait_for_termination(handle, on_stop=close_segments, compute=compute)
    return 0
