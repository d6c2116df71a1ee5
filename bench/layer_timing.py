"""Where one decoder layer's time goes on the CPU device: GEMM calls vs everything else.

    .venv/bin/python bench/layer_timing.py [--model bench-mixtral] [--tokens 256,1024]
        [--cpu-gemm auto|panels|torch] [--threads 2] [--dtype float32|bfloat16]

Runs `pre_attention` + `post_attention` of layer 0 (attention output random) as the expert
service does, with its weight layout, and times every GEMM call inside (`linear`, and with panels
the fused `swiglu` / `grouped_swiglu`, whose gathers and epilogues count as GEMM time); prints
per token count the layer's milliseconds, the GEMM calls' milliseconds and GFLOP/s, and the rest
(norms, RoPE, routing, activations and gathers outside the GEMMs). Best of `--repeats`.
"""

from __future__ import annotations

import argparse
import time

import torch

import moelens.model.moe as moe
import moelens.model.stages as stages
from moelens import panel_gemm
from moelens.checkpoint import load_weights
from moelens_cli.bench_common import resolve_bench_model
from services.expert_gpu.layer_store import LayerStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-mixtral")
    parser.add_argument("--tokens", default="256,1024")
    parser.add_argument("--cpu-gemm", default="auto", choices=panel_gemm.MODES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg, weights = load_weights(resolve_bench_model(args.model), dtype)
    panels = panel_gemm.resolve_mode(args.cpu_gemm, "cpu", dtype)
    layer = LayerStore(weights.layers[:1], torch.device("cpu"), 1, panels).layer(0)
    inv_freq = stages.rope_inv_freq(cfg)
    gemm = {"s": 0.0, "flops": 0.0}

    def timed(fn, flops):
        def call(*args):
            start = time.perf_counter()
            y = fn(*args)
            gemm["s"] += time.perf_counter() - start
            gemm["flops"] += flops(*args)
            return y
        return call

    def linear_flops(x, w, bias=None):
        return 2.0 * x.numel() * w.shape[-2]

    def experts_flops(x, pair_token, pair_weight, counts, gate_up, down):
        return 2.0 * pair_token.numel() * x.shape[-1] * (gate_up.shape[-2] + down.shape[-1])

    moe.linear = stages.linear = timed(panel_gemm.linear, linear_flops)
    panel_gemm.swiglu = timed(panel_gemm.swiglu, linear_flops)
    panel_gemm.grouped_swiglu = timed(panel_gemm.grouped_swiglu, experts_flops)
    print(f"{'panels' if panels else 'F.linear'} GEMMs, {args.dtype}, {args.threads} threads")
    for n in (int(t) for t in args.tokens.split(",")):
        hidden = torch.randn(n, cfg.hidden_size, dtype=dtype)  # [T, H]
        rope = stages.rope_tables(torch.arange(n) % cfg.max_position_embeddings, inv_freq,
                                  hidden.dtype)
        attn = torch.randn(n, cfg.num_heads, cfg.head_dim, dtype=dtype)  # [T, Hq, D]
        best = None
        with torch.inference_mode():
            for _ in range(args.repeats):
                gemm.update(s=0.0, flops=0.0)
                start = time.perf_counter()
                stages.pre_attention(cfg, layer, hidden, rope)
                stages.post_attention(cfg, layer, hidden, attn)
                total = time.perf_counter() - start
                if best is None or total < best[0]:
                    best = (total, gemm["s"], gemm["flops"])
        total, gemm_s, flops = best
        print(f"tokens {n:5d}: layer {total * 1e3:7.1f} ms, GEMM calls {gemm_s * 1e3:7.1f} ms "
              f"({flops / gemm_s / 1e9:5.1f} GFLOP/s), other {(total - gemm_s) * 1e3:6.1f} ms "
              f"({(total - gemm_s) / total:.0%})")


if __name__ == "__main__":
    main()
