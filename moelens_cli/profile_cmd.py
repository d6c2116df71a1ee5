"""`moe-lens profile`: measure this machine's HardwareProfile for a model and save it as JSON.

With `--expert ADDR --attention ADDR` it asks the running services for what they measured at
warmup (the GEMM line on the real layer and device, host->device bandwidth, the real exchange
stream, the attention kernel's KV and host read bandwidth) — the profile the coordinator uses.
Otherwise it measures locally with torch (moelens.profiler): the GEMM line of one layer of the
model's shapes, host memory and host→device copy bandwidth, the attention service's decode kernel
(native when it builds, else the torch reference), and an in-process activation copy.
"""

from __future__ import annotations

import argparse
import sys

import torch

from moelens.config import load_config
from moelens.profile import save_profile
from moelens.profiler import profile_local

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder with the model's config.json")
    parser.add_argument("--out", required=True, help="where to write the profile JSON")
    parser.add_argument("--quick", action="store_true", help="small measurements (seconds)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the GEMMs run (auto: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="compute dtype of the weights (the expert service's --dtype)")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="threads for the GEMMs and the attention kernel (match the "
                             "services' --num-threads; default 1, as they)")
    parser.add_argument("--expert", default=None, help="running expert service host:port")
    parser.add_argument("--attention", default=None, help="running attention service host:port")


def _profile_from_running(cfg, expert: str, attention: str):
    import grpc

    from moelens.v1 import attention_pb2, attention_pb2_grpc, expert_pb2, expert_pb2_grpc
    from services.coordinator.lens import profile_from_services
    with grpc.insecure_channel(expert) as e, grpc.insecure_channel(attention) as a:
        e_info = expert_pb2_grpc.ExpertServiceStub(e).Info(expert_pb2.ExpertInfoRequest(),
                                                           timeout=30)
        a_info = attention_pb2_grpc.AttentionServiceStub(a).Info(
            attention_pb2.AttentionInfoRequest(), timeout=30)
    if not e_info.is_ready:
        raise ValueError(f"the expert service at {expert} has not finished its warmup")
    return profile_from_services(cfg, e_info, a_info)


def _attention_kernel():
    """The attention service's kernel (native C++ when it builds); None: the torch reference."""
    try:
        from services.attention_cpu import kernel
    except ImportError:
        return None
    return kernel.paged_attention


def run(args: argparse.Namespace) -> int:
    if args.num_threads < 1:
        print("moe-lens profile: error: --num-threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.num_threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if (args.expert is None) != (args.attention is None):
        print("moe-lens profile: error: give both --expert and --attention, or neither",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.model)
        if args.expert:
            profile = _profile_from_running(cfg, args.expert, args.attention)
        else:
            profile = profile_local(cfg, quick=args.quick, device=device,
                                    dtype=DTYPES[args.dtype],
                                    attention_kernel=_attention_kernel())
    except (ValueError, FileNotFoundError) as err:
        print(f"moe-lens profile: error: {err}", file=sys.stderr)
        return 2
    save_profile(profile, args.out)
    print(f"profile of {profile.device} ({profile.dtype}) -> {args.out}")
    print(f"  host->device copy     {profile.io_bandwidth_bytes_per_s / 1e9:8.2f} GB/s")
    print(f"  host memory read      {profile.host_memory_bandwidth_bytes_per_s / 1e9:8.2f} GB/s")
    print(f"  attention KV read     {profile.attention_kv_bytes_per_s / 1e9:8.2f} GB/s")
    print(f"  GEMM line per layer   {profile.gemm_intercept_s * 1e3:.3f} ms + "
          f"{profile.gemm_slope_s_per_token * 1e6:.3f} us/token "
          f"({profile.gemm_flops_per_s / 1e9:.1f} GFLOP/s)")
    print(f"  activation exchange   {profile.exchange_fixed_s * 1e6:.1f} us + "
          f"{1 / max(profile.exchange_s_per_byte, 1e-30) / 1e9:.2f} GB/s")
    return 0
