"""Deterministic synthetic checkpoints in Hugging Face layout, and the built-in default model.

`make_model(preset, out)` writes config.json, generation_config.json, model.safetensors (the
per-expert hub layout public loaders read), tokenizer.json and tokenizer_config.json.
Weights depend only on (preset, seed, parameter name): each tensor draws from its own
generator seeded by a hash of its name, so they are identical on every machine and run.

`ensure_default_model()` builds the `default` preset once into the user cache and returns
its folder; processes racing to build it each build privately and the first rename wins.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import platformdirs
import torch

from moelens.model_presets import Preset, get_preset
from moelens.tokenizer import BOS_TOKEN, DEFAULT_VOCAB_SIZE, EOS_TOKEN, UNK_TOKEN, build_tokenizer

DEFAULT_MODEL_VERSION = "v1"
"""Bump when anything that changes the default model's bytes changes (recipe, corpus, seed)."""
DEFAULT_SEED = 0
DEFAULT_MODEL_NAME = "default"
"""What `--model` accepts for the built-in model."""


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the default model lives: `<user cache>/moe-lens/models/default-<version>`."""
    root = Path(cache_dir) if cache_dir is not None else Path(
        platformdirs.user_cache_dir("moe-lens"))
    return root / "models" / f"{DEFAULT_MODEL_NAME}-{DEFAULT_MODEL_VERSION}"


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The built-in model's folder, built on first use (a few seconds, 80 MB)."""
    final = default_model_dir(cache_dir)
    if (final / "config.json").is_file():
        return final
    _build_atomically(DEFAULT_MODEL_NAME, final, DEFAULT_SEED, replace_existing_ok=True)
    return final


def resolve_model(spec: str | Path) -> Path:
    """A `--model` value: `default` for the built-in model, else a checkpoint folder."""
    if str(spec) == DEFAULT_MODEL_NAME:
        return ensure_default_model()
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {spec}: no config.json there; pass a Hugging Face checkpoint "
                         f"folder, or '{DEFAULT_MODEL_NAME}' for the built-in model")
    return path


def make_model(preset: str, out: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the checkpoint of `preset` to `out` (which must not exist, or be empty)."""
    get_preset(preset)  # fail on a bad name before touching the disk
    out = Path(out)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        raise FileExistsError(f"{out} already exists and is not empty: choose another --out "
                              f"or delete it first")
    _build_atomically(preset, out, seed, replace_existing_ok=False)
    return out


def _build_atomically(preset: str, final: Path, seed: int, replace_existing_ok: bool) -> None:
    """Build in a sibling temp folder, then rename: readers never see a half-written model."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _write_checkpoint(get_preset(preset), tmp, seed)
        # mkdtemp and save_pretrained make some of it private; a model folder is plain data
        # that containers running as another user also read.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            lost_race = exc.errno in (errno.ENOTEMPTY, errno.EEXIST)
            if not (lost_race and replace_existing_ok and (final / "config.json").is_file()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_checkpoint(preset: Preset, out: Path, seed: int) -> None:
    # transformers is slow to import; only building a model needs it.
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    tok = build_tokenizer(DEFAULT_VOCAB_SIZE)
    config = preset.make_config(tok.get_vocab_size(with_added_tokens=True))
    # Skip transformers' own init (it depends on module order and the global RNG).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    fill_weights(model, config.initializer_range, seed)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN,
                                         eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
                                         model_max_length=config.max_position_embeddings)
        hf_tok.save_pretrained(out)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def fill_weights(model: torch.nn.Module, std: float, seed: int) -> None:
    """Norm weights to 1, everything else N(0, std), each from a generator seeded by its name."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.fill_(1.0)
                continue
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            param.normal_(0.0, std, generator=gen)


def checkpoint_digest(model_dir: str | Path) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes in `model_dir/*.safetensors`."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
