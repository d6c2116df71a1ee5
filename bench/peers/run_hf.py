"""Peer: Hugging Face transformers `generate()` on the bench-mixtral checkpoint, fp32, greedy.

Each batch size runs one batch of that many prompts (same length, so no padding) generating
exactly --gen-len tokens (min_new_tokens = max_new_tokens); out tok/s = batch x gen-len / wall
time including prefill. Runs in its own venv: torch==2.13.0, transformers==5.24.0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers  # noqa: E402

from peer_common import (PeerResult, PeerRow, add_peer_arguments, batch_sizes,  # noqa: E402
                         make_prompts, record, vocab_size_of)


def generate(model, prompts: list[list[int]], gen_len: int) -> int:
    ids = torch.tensor(prompts)  # [B, P]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len,
                         min_new_tokens=gen_len, do_sample=False, pad_token_id=0)
    return int(out.shape[0] * (out.shape[1] - ids.shape[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_peer_arguments(parser)
    parser.add_argument("--experts-implementation", default="eager",
                        help="transformers' MoE path (eager loops over experts; batched_mm "
                             "allocates tens of GB on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32,
        experts_implementation=args.experts_implementation).eval()
    vocab = vocab_size_of(args.model)
    result = PeerResult("HF transformers generate()", transformers.__version__, args.threads,
                        args.prompt_len, args.gen_len,
                        notes=f"experts_implementation={args.experts_implementation}")
    with torch.inference_mode():
        generate(model, make_prompts(1, 8, vocab, args.seed + 99), 2)  # warm-up
        for bs in batch_sizes(args.batch_sizes):
            prompts = make_prompts(bs, args.prompt_len, vocab, args.seed)
            start = time.perf_counter()
            tokens = generate(model, prompts, args.gen_len)
            record(result, PeerRow(bs, bs, tokens, time.perf_counter() - start), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
