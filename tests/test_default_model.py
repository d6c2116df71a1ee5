"""The built-in tokenizer, the synthetic checkpoints and the streaming detokenizer.

References we did not write: `tokenizers` for full decodes, Hugging Face transformers for
loading the checkpoints (AutoModelForCausalLM / AutoTokenizer) and for greedy generation.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

from moelens.config import load_config
from moelens.default_model import (checkpoint_digest, default_model_dir, ensure_default_model,
                                   make_model, resolve_model)
from moelens.model_presets import PRESETS
from moelens.tokenizer import (BOS_ID, DEFAULT_VOCAB_SIZE, EOS_ID, Tokenizer,
                               TokenizerMissingError, build_tokenizer)

TINY_PRESETS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe"]
PROMPTS = ["The weather today", "Once upon a time", "A computer is",
           "Question: What is the capital of France?"]
TEXTS = ["Hello world, the café ☕ is open. 日本語のテキスト",
         "Emoji 👩‍👩‍👧 and ünïcödé, spaces  and\ttabs\nnew lines",
         "The morning was cold and clear, and the river ran fast."]


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory) -> Path:
    return ensure_default_model(cache_dir=tmp_path_factory.mktemp("cache"))


def _hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, experts_implementation="eager", output_loading_info=True)
    # Every tensor the model needs is in the file, under the name transformers expects.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


# Tokenizer -----------------------------------------------------------------------------------

def test_tokenizer_is_deterministic_and_has_special_ids():
    first, second = build_tokenizer(), build_tokenizer()
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == DEFAULT_VOCAB_SIZE
    assert first.token_to_id("<s>") == BOS_ID and first.token_to_id("</s>") == EOS_ID


def test_wrapper_round_trips_text_like_hf(default_dir):
    from transformers import AutoTokenizer
    tok = Tokenizer.load(default_dir)
    hf_tok = AutoTokenizer.from_pretrained(default_dir)
    assert tok.vocab_size == DEFAULT_VOCAB_SIZE
    assert tok.eos_token_ids == (EOS_ID,) and tok.bos_token_id == BOS_ID
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == BOS_ID
        assert ids == hf_tok(text).input_ids
        assert tok.decode(ids) == text
        assert tok.encode(text, add_special_tokens=False) == ids[1:]


def test_folder_without_tokenizer_serves_ids_only(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.maybe_load(tmp_path) is None
    with pytest.raises(TokenizerMissingError, match="prompt_token_ids"):
        Tokenizer.load(tmp_path)


def _stream(tok: Tokenizer, ids: list[int], chunk_sizes: list[int]) -> str:
    detok, out, pos = tok.detokenizer(), [], 0
    for size in chunk_sizes:
        delta = detok.push(ids[pos:pos + size])
        pos += size
        out.append(delta)
        assert tok.decode(ids).startswith("".join(out)), "emitted text must be final"
    out.append(detok.flush())
    return "".join(out)


def test_incremental_detokenizer_matches_full_decode(default_dir):
    tok = Tokenizer.load(default_dir)
    rng = random.Random(0)
    cases = [tok.encode(t) for t in TEXTS]
    # Random ids include lone UTF-8 continuation bytes and special tokens, as a random model emits.
    cases += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
              for _ in range(200)]
    for ids in cases:
        one_by_one = _stream(tok, ids, [1] * len(ids))
        assert one_by_one == tok.decode(ids)
        chunks = [rng.randrange(1, 5) for _ in range(len(ids))]
        assert _stream(tok, ids, chunks) == tok.decode(ids)


def test_detokenizer_holds_a_split_character(default_dir):
    tok = Tokenizer.load(default_dir)
    ids = tok.encode("☕", add_special_tokens=False)
    assert len(ids) > 1  # three UTF-8 bytes, no merge for them in the English corpus
    detok = tok.detokenizer()
    assert [detok.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["☕"]


# Checkpoints ---------------------------------------------------------------------------------

def test_default_model_is_deterministic(default_dir, tmp_path):
    again = make_model("default", tmp_path / "again")
    assert checkpoint_digest(again) == checkpoint_digest(default_dir)
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (again / name).read_bytes() == (default_dir / name).read_bytes()
    other_seed = make_model("tiny-mixtral", tmp_path / "s1", seed=1)
    assert checkpoint_digest(other_seed) != checkpoint_digest(
        make_model("tiny-mixtral", tmp_path / "s0", seed=0))


def test_default_model_shape(default_dir):
    raw = json.loads((default_dir / "config.json").read_text())
    assert raw["model_type"] == "mixtral" and raw["num_local_experts"] == 8
    assert raw["num_attention_heads"] == 8 and raw["num_key_value_heads"] == 2
    assert raw["vocab_size"] == DEFAULT_VOCAB_SIZE
    cfg = load_config(default_dir)
    assert cfg.top_k == 2 and cfg.num_layers == 4 and cfg.eos_token_ids == (EOS_ID,)


def test_default_model_greedy_output_is_varied(default_dir):
    tok, model = Tokenizer.load(default_dir), _hf_model(default_dir)
    outputs = [_greedy(model, tok.encode(p), 32) for p in PROMPTS]
    assert len({tuple(o) for o in outputs}) == len(PROMPTS)
    for out in outputs:
        assert len(set(out)) >= 16, f"greedy output collapses into repeats: {out}"


def test_ensure_default_model_reuses_the_cache(tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_default_model(tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [default_model_dir(tmp_path)] * 2
    assert [p.name for p in (tmp_path / "models").iterdir()] == [results[0].name]
    mtime = (results[0] / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(tmp_path) == results[0]
    assert (results[0] / "model.safetensors").stat().st_mtime_ns == mtime


def test_resolve_model_and_make_model_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ValueError, match="unknown preset"):
        make_model("tiny-gpt", tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        make_model("tiny-mixtral", tmp_path / "busy")


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_presets_load_in_hf_and_generate(preset, tmp_path):
    model_dir = make_model(preset, tmp_path / preset)
    cfg = load_config(model_dir)
    assert cfg.model_type == PRESETS[preset].make_config(DEFAULT_VOCAB_SIZE).model_type
    model = _hf_model(model_dir)
    tok = Tokenizer.load(model_dir)
    outputs = [_greedy(model, tok.encode(p), 16) for p in PROMPTS]
    assert len({tuple(o) for o in outputs}) > 1
    assert all(len(set(o)) > 4 for o in outputs)


def test_make_model_cli(tmp_path, capsys):
    import argparse

    from moelens_cli import make_model as cli
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "cli"
    assert cli.run(parser.parse_args(["--preset", "tiny-olmoe", "--out", str(out)])) == 0
    assert "wrote tiny-olmoe" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "olmoe"
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.iterdir())  # readable by others
    assert cli.run(parser.parse_args(["--preset", "tiny-olmoe", "--out", str(out)])) == 2
    assert "already exists" in capsys.readouterr().err
