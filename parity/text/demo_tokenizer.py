"""The demo's tokenizer: a tiny BPE trained, deterministically, on a few paragraphs kept in the
repo (`parity/data/demo_corpus.txt`), so `twinlm demo` and `twinlm generate` need no download.

The tokenizer is sentencepiece-like, as LLaMA's: a word starts with the marker "▁" (Metaspace), so
decoding restores the spaces; `<pad>`, `<s>`, `</s>`, `<unk>` take ids 0-3 (the demo configs'
pad, bos and eos ids), and `<s>` is put before every encoded text.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CORPUS", "SPECIAL_TOKENS", "demo_tokenizer_json", "save_demo_tokenizer"]

CORPUS = Path(__file__).resolve().parent.parent / "data" / "demo_corpus.txt"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def demo_tokenizer_json(vocab_size: int) -> str:
    """The `tokenizer.json` text of a BPE with at most `vocab_size` ids trained on `CORPUS`.

    The trainer is deterministic for a given corpus and settings (merges are chosen by count, ties
    by the pair itself), so the same file comes out on every run; a test checks it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
                                  show_progress=False)
    paragraphs = [p.strip() for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    tok.train_from_iterator(paragraphs, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def save_demo_tokenizer(directory: str | os.PathLike, vocab_size: int) -> Path:
    """Write the demo tokenizer as `directory/tokenizer.json`; returns its path."""
    path = Path(directory) / "tokenizer.json"
    path.write_text(demo_tokenizer_json(vocab_size), encoding="utf-8")
    return path
