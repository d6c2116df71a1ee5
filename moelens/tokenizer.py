"""Text <-> token ids for the services, and the built-in tokenizer of the synthetic models.

`build_tokenizer` trains a byte-level BPE on a fixed English text shipped in the source
(`tokenizer_corpus.CORPUS`), so every machine gets the same `tokenizer.json` with no download.
`Tokenizer` wraps any Hugging Face `tokenizer.json`; a model folder without one still serves
token ids, and asking it for text raises `TokenizerMissingError` naming what to send instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from moelens.tokenizer_corpus import CORPUS

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
DEFAULT_VOCAB_SIZE = 1024
"""Reachable from CORPUS: the trainer stops early (at ~1480) if asked for more than it can merge."""

# A replacement character at the end of a decoded chunk means its last token ends inside a
# multi-byte character; the streaming detokenizer waits for the next token before emitting.
_INCOMPLETE = "\ufffd"


class TokenizerMissingError(ValueError):
    """Text was asked of a model folder that has no tokenizer.json."""


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> tokenizers.Tokenizer:
    """Train the deterministic byte-level BPE (ids 0,1,2 = <unk>, <s>, </s>; BOS prepended)."""
    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size must be at least 259 (256 bytes + 3 special tokens), "
                         f"got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)])
    return tok


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _as_id_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]  # type: ignore[union-attr]


def _eos_ids(model_dir: Path, tok: tokenizers.Tokenizer) -> tuple[int, ...]:
    """EOS ids as generate() would stop on them: generation_config, then config, then tokenizer."""
    ids = _as_id_list(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
    if not ids:
        ids = _as_id_list(_read_json(model_dir / "config.json").get("eos_token_id"))
    if not ids:
        eos = _read_json(model_dir / "tokenizer_config.json").get("eos_token")
        if isinstance(eos, dict):  # older files store an AddedToken dict
            eos = eos.get("content")
        token_id = tok.token_to_id(eos) if isinstance(eos, str) else None
        ids = [] if token_id is None else [token_id]
    return tuple(dict.fromkeys(ids))


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character.

    Call `push(new_ids)` as tokens arrive; each call returns the text that became final. The
    concatenation of all deltas and `flush()` equals `decode(all_ids)`.
    """

    tokenizer: "Tokenizer"
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    """Start of the already-emitted context decoded together with the unread tokens."""
    read_offset: int = 0
    """Tokens before this index have been emitted as text."""

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE):
            return ""
        # The chunk just emitted becomes the context of the next decode: decoders that strip a
        # leading space at the start of a text (SentencePiece) then see a continuation, and
        # decoding starts on a character boundary (the vLLM/TGI scheme).
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Emit whatever is still held (an unfinished character decodes to U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text):]

    @property
    def text(self) -> str:
        """Everything decoded so far, held tokens included."""
        return self._decode(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


class Tokenizer:
    """A `tokenizer.json` plus the EOS ids of the model folder it came from."""

    def __init__(self, tok: tokenizers.Tokenizer, eos_token_ids: tuple[int, ...] = (),
                 bos_token_id: int | None = None) -> None:
        self._tok = tok
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id

    @classmethod
    def load(cls, model_dir: str | Path) -> "Tokenizer":
        """Read `model_dir/tokenizer.json`; raise TokenizerMissingError if there is none."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerMissingError(
                f"{model_dir} has no tokenizer.json, so text cannot be encoded or decoded: send "
                f"prompt_token_ids instead of a prompt, or put a tokenizer.json in the folder "
                f"(`moe-lens make-model` writes one)")
        tok = tokenizers.Tokenizer.from_file(str(path))
        bos = _read_json(model_dir / "config.json").get("bos_token_id")
        return cls(tok, _eos_ids(model_dir, tok), bos if isinstance(bos, int) else None)

    @classmethod
    def maybe_load(cls, model_dir: str | Path) -> "Tokenizer | None":
        """The tokenizer of `model_dir`, or None when it serves token ids only."""
        if not (Path(model_dir) / "tokenizer.json").is_file():
            return None
        return cls.load(model_dir)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows (the model's embedding may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids the tokenizer does not know are dropped."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one sequence's generated ids."""
        return IncrementalDetokenizer(self, skip_special_tokens)
