"""Text in and out: the tokenizer file of a checkpoint directory.

A Hugging Face checkpoint carries its tokenizer beside the weights, as `tokenizer.json` (the
`tokenizers` library's format) or `tokenizer.model` (a sentencepiece model, LLaMA 1/2 and
Grok-1). `load_tokenizer(dir)` reads whichever is there (`tokenizer.json` first) into one small
interface, `Tokenizer.encode(text) -> ids` and `Tokenizer.decode(ids) -> text`, and
`StreamDecoder` turns a growing list of ids into the text each new token adds.

`tokenizers` is a dependency of twinlm; `sentencepiece` is imported only when a directory holds a
`tokenizer.model`. Like the rest of `weights/`, this module imports neither torch nor jax.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import CheckpointError

__all__ = ["TOKENIZER_FILES", "StreamDecoder", "Tokenizer", "load_tokenizer"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class Tokenizer:
    """Text <-> token ids; `path` is the file it was read from."""

    path: Path

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (special tokens included)."""
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, what the tokenizer adds around it (a bos token)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; ids the tokenizer does not know are skipped."""
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` read with the `tokenizers` library."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise CheckpointError(f"{self.path}: not a valid tokenizer.json ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        known = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(known, skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """A `tokenizer.model` read with `sentencepiece`; `encode` prepends the model's bos token, as
    LLaMA's tokenizer does by default."""

    def __init__(self, path: str | os.PathLike):
        try:
            import sentencepiece
        except ImportError:
            raise CheckpointError(f"{path}: reading a sentencepiece tokenizer.model needs the `sentencepiece` "
                                  "package: pip install sentencepiece") from None
        self.path = Path(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: not a valid sentencepiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(self._sp.encode(text))
        bos = self._sp.bos_id()
        return ([bos] if add_special_tokens and bos >= 0 else []) + ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        special = {self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()} if skip_special_tokens else set()
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in special])


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory (`tokenizer.json`, else `tokenizer.model`), or None
    when it has neither."""
    d = Path(directory)
    if (d / "tokenizer.json").is_file():
        return HFTokenizer(d / "tokenizer.json")
    if (d / "tokenizer.model").is_file():
        return SentencePieceTokenizer(d / "tokenizer.model")
    return None


class StreamDecoder:
    """The text each new token adds, for streaming. Decoding token by token would split a
    multi-byte character or a word-start marker across tokens, so the whole sequence is decoded
    each time and only the new suffix is returned; while the tail is an incomplete character
    (decoded as U+FFFD), it is held back until the next token completes it."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream."""
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return new
