"""GPU check for a CUDA machine: profile, n_real, and throughput of a Mixtral-8x7B-shaped model
under a device budget, beside the performance model's Stage-1 bound.

    python bench/gpu_check.py --layers 8 --device-memory-gb 16 --out /tmp/gpu_check

Random bf16 weights with Mixtral-8x7B's layer shapes (hidden 4096, 14336 expert intermediate,
8 experts top-2, 32/8 heads, vocab 32000), `--layers` of them (2.8 GB each), so that a 16 GiB
budget keeps some layers resident and streams the rest.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

MIXTRAL_8X7B = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000,
                    hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
                    tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16",
                    bos_token_id=1, eos_token_id=2)


def write_checkpoint(out: Path, num_layers: int) -> Path:
    """One safetensors shard per layer, generated on the GPU (fast) in bf16."""
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**MIXTRAL_8X7B, "num_hidden_layers": num_layers}
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = h, 8 * 128

    def rnd(*shape):
        return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()

    weight_map = {}
    head = {"model.embed_tokens.weight": rnd(v, h), "lm_head.weight": rnd(v, h),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    save_file(head, out / "head.safetensors")
    weight_map.update({k: "head.safetensors" for k in head})
    for layer in range(num_layers):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
             p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
             p + "block_sparse_moe.gate.weight": rnd(8, h)}
        for e in range(8):
            m = f"{p}block_sparse_moe.experts.{e}."
            t.update({m + "w1.weight": rnd(i, h), m + "w3.weight": rnd(i, h), m + "w2.weight": rnd(h, i)})
        name = f"layer{layer}.safetensors"
        save_file(t, out / name)
        weight_map.update({k: name for k in t})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device-memory-gb", type=float, default=16.0)
    parser.add_argument("--kv-cache-gb", type=float, default=32.0)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from moelens_cli.launcher import LaunchOptions, start_local_services
    from moelens_client import Client
    from moelens.config import load_config
    from moelens.v1 import attention_pb2, attention_pb2_grpc, expert_pb2, expert_pb2_grpc
    from services.coordinator.lens import LiveLens, profile_from_services
    from services.coordinator.perf_model import Workload, predict
    import grpc

    start = time.perf_counter()
    model_dir = write_checkpoint(args.out / "mixtral-8x7b-shaped", args.layers)
    print(f"checkpoint: {args.layers} layers in {time.perf_counter() - start:.1f} s")
    options = LaunchOptions(model=str(model_dir), device="cuda", dtype="bfloat16",
                            device_memory_gb=args.device_memory_gb, kv_cache_gb=args.kv_cache_gb,
                            kv_dtype="bfloat16", log_dir=args.out / "logs", startup_timeout_s=900)
    with start_local_services(options) as services:
        expert = expert_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(services.expert_address))
        attention = attention_pb2_grpc.AttentionServiceStub(
            grpc.insecure_channel(services.attention_address))
        e_info = expert.Info(expert_pb2.ExpertInfoRequest())
        a_info = attention.Info(attention_pb2.AttentionInfoRequest())
        cfg = load_config(model_dir)
        lens = LiveLens.build(cfg, profile_from_services(cfg, e_info, a_info), e_info, a_info)
        prediction = predict(lens.spec, lens.profile,
                             Workload(args.prompt_len, args.gen_len, args.num_requests),
                             lens.deployment)
        print(f"B_IO (h2d): {e_info.h2d_bytes_per_s / 1e9:.1f} GB/s")
        print(f"GEMM line per layer: {e_info.layer_gemm.intercept_s * 1e3:.2f} ms + "
              f"{e_info.layer_gemm.slope_s * 1e6:.2f} us/token")
        print(f"layers: {e_info.num_resident_layers} resident, {e_info.num_streamed_layers} "
              f"streamed ({e_info.weight_bytes_streamed_per_step / 1e9:.1f} GB/step)")
        print(f"n_real: {lens.token_budget()}")
        prompts = [[(7 * j + r) % 32000 for j in range(args.prompt_len)]
                   for r in range(args.num_requests)]
        with Client(services.coordinator_address) as client:
            start = time.perf_counter()
            client.generate_batch(prompts, max_tokens=args.gen_len, min_tokens=args.gen_len,
                                  ignore_eos=True, temperature=0, progress=False,
                                  max_concurrency=args.num_requests)
            wall = time.perf_counter() - start
        total = args.num_requests * (args.prompt_len + args.gen_len)
        print(f"measured: {total / wall:.1f} total tok/s, "
              f"{args.num_requests * args.gen_len / wall:.1f} output tok/s ({wall:.1f} s)")
        print(f"Stage-1 bound T_max: {prediction.stage1.t_max:.1f} tok/s; Stage-2 prediction "
              f"{prediction.stage2.total_tokens_per_s:.1f} tok/s; bottleneck "
              f"{prediction.bottleneck}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "layers": args.layers,
            "device_memory_gb": args.device_memory_gb, "kv_cache_gb": args.kv_cache_gb,
            "num_requests": args.num_requests, "prompt_len": args.prompt_len,
            "gen_len": args.gen_len, "h2d_bytes_per_s": e_info.h2d_bytes_per_s,
            "layer_gemm_intercept_s": e_info.layer_gemm.intercept_s,
            "layer_gemm_slope_s": e_info.layer_gemm.slope_s,
            "num_resident_layers": e_info.num_resident_layers,
            "num_streamed_layers": e_info.num_streamed_layers,
            "weight_bytes_streamed_per_step": e_info.weight_bytes_streamed_per_step,
            "token_budget": lens.token_budget(), "wall_s": wall,
            "total_tokens_per_s": total / wall,
            "output_tokens_per_s": args.num_requests * args.gen_len / wall,
            "stage1_t_max": prediction.stage1.t_max,
            "predicted_total_tokens_per_s": prediction.stage2.total_tokens_per_s,
            "bottleneck": prediction.bottleneck}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
