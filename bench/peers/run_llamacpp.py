"""Peer: llama.cpp through llama-cpp-python 0.3.36 (built from source, f32 or bf16 GGUF), batched.

Conversion: the checkpoint goes through the sdist's own vendor/llama.cpp/convert_hf_to_gguf.py
at --outtype f32 (`--dtype float32`, default) or bf16 (`--dtype bfloat16`). That script wants a tokenizer file in the model folder, and our byte-level
tokenizer.json is not one it recognises, so the conversion folder gets a small SentencePiece
model trained here (the converter pads the vocabulary to the model's 32000 with [PAD] tokens;
the benchmark feeds ids, never text). The weights are linked, not copied.

Generation uses the low-level API: one llama_batch with every prompt (one sequence id each),
then one decode call per step with a token per sequence, greedy argmax over each row's logits;
n_seq_max = batch size, n_threads = --threads.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from peer_common import (PeerResult, PeerRow, add_peer_arguments, batch_sizes,  # noqa: E402
                         make_prompts, record, vocab_size_of)

CORPUS_MODULES = ("argparse", "asyncio", "collections", "csv", "dataclasses", "email",
                  "functools", "http.client", "inspect", "json", "logging", "os", "pathlib",
                  "pickle", "random", "re", "shutil", "socket", "statistics", "string",
                  "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
                  "urllib.request", "zipfile")
"""The tokenizer's training text: these standard-library modules' docstrings (local, fixed)."""


def corpus_lines() -> list[str]:
    import importlib
    import inspect
    lines = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            lines += [line for line in (doc or "").splitlines() if line.strip()]
    return lines


def train_tokenizer(out: Path, vocab_size: int = 512) -> None:
    import io

    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines()), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe",
                                   hard_vocab_limit=False, minloglevel=2)
    out.write_bytes(model.getvalue())


OUTTYPES = {"float32": "f32", "bfloat16": "bf16"}


def convert(model_dir: Path, sdist: Path, work: Path, outtype: str) -> Path:
    """The GGUF of model_dir in `outtype` (f32, bf16; made once, kept in `work`)."""
    gguf = work / f"model-{outtype}.gguf"
    if gguf.is_file():
        return gguf
    folder = work / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.suffix == ".safetensors" or path.name in ("config.json", "generation_config.json",
                                                           "model.safetensors.index.json"):
            target = folder / path.name
            if not target.exists():
                target.symlink_to(path.resolve())
    train_tokenizer(folder / "tokenizer.model")
    script = sdist / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    subprocess.run([sys.executable, str(script), str(folder), "--outtype", outtype,
                    "--outfile", str(gguf)], check=True, cwd=script.parent)
    return gguf


class Engine:
    """A llama.cpp model and one context sized for `batch` sequences of `seq_len` tokens."""

    def __init__(self, gguf: Path, batch: int, seq_len: int, threads: int):
        import llama_cpp as lc
        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(),
                                                   lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.max_tokens = max(batch * seq_len, 512)
        params = lc.llama_context_default_params()
        params.n_ctx = batch * (-(-seq_len // 256) * 256)  # per-sequence share, 256-aligned
        params.n_batch, params.n_ubatch = self.max_tokens, 512
        params.n_seq_max, params.n_threads, params.n_threads_batch = batch, threads, threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.batch = lc.llama_batch_init(self.max_tokens, 0, 1)

    def decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence id, wants logits)."""
        b = self.batch
        for i, (token, pos, seq, wants) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, wants
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        code = self.lc.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def argmax(self, row: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, row)
        logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                       shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def generate(self, prompts: list[list[int]], gen_len: int) -> int:
        """Greedy, exactly gen_len tokens per prompt; returns the tokens generated."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        rows = [(t, pos, seq, pos == len(p) - 1)
                for seq, p in enumerate(prompts) for pos, t in enumerate(p)]
        self.decode(rows)
        last_rows = np.cumsum([len(p) for p in prompts]) - 1
        tokens = [self.argmax(int(r)) for r in last_rows]
        for step in range(gen_len - 1):
            self.decode([(tok, len(p) + step, seq, True)
                         for seq, (tok, p) in enumerate(zip(tokens, prompts))])
            tokens = [self.argmax(i) for i in range(len(prompts))]
        return len(prompts) * gen_len

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_peer_arguments(parser)
    parser.add_argument("--sdist", required=True, type=Path,
                        help="the unpacked llama-cpp-python sdist (for convert_hf_to_gguf.py)")
    parser.add_argument("--work", required=True, type=Path,
                        help="folder for the conversion and the GGUF (kept between runs)")
    parser.add_argument("--dtype", default="float32", choices=sorted(OUTTYPES),
                        help="the GGUF's weight type")
    args = parser.parse_args()
    import llama_cpp
    outtype = OUTTYPES[args.dtype]
    gguf = convert(Path(args.model), args.sdist, args.work, outtype)
    vocab = vocab_size_of(args.model)
    result = PeerResult("llama.cpp (llama-cpp-python)", llama_cpp.__version__, args.threads,
                        args.prompt_len, args.gen_len, notes=f"{outtype} GGUF, batched low-level API")
    for bs in batch_sizes(args.batch_sizes):
        engine = Engine(gguf, bs, args.prompt_len + args.gen_len, args.threads)
        try:
            engine.generate(make_prompts(bs, 8, vocab, args.seed + 99), 2)  # warm-up
            prompts = make_prompts(bs, args.prompt_len, vocab, args.seed)
            start = time.perf_counter()
            tokens = engine.generate(prompts, args.gen_len)
            record(result, PeerRow(bs, bs, tokens, time.perf_counter() - start), args.json)
        finally:
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
