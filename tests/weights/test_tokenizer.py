"""Text in and out: the demo tokenizer is trained the same on every run, both tokenizer formats
round-trip text, the stream decoder's pieces add up to the whole text, and a missing
`sentencepiece` package gets a message saying what to install."""

from __future__ import annotations

import sys

import pytest

from parity.text.demo_tokenizer import CORPUS, demo_tokenizer_json, save_demo_tokenizer
from weights.errors import CheckpointError
from weights.tokenizer import StreamDecoder, load_tokenizer

SENTENCES = [p.strip() for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()][:3]


def test_demo_tokenizer_is_deterministic_and_round_trips(tmp_path):
    assert demo_tokenizer_json(256) == demo_tokenizer_json(256)
    save_demo_tokenizer(tmp_path, 256)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 256
    for text in SENTENCES + ["the cache keeps keys and values"]:
        ids = tok.encode(text)
        assert ids[0] == 1 and len(ids) < len(text)  # <s> first; merges make tokens longer than a character
        assert tok.decode(ids) == text


def test_stream_decoder_pieces_add_up(tmp_path):
    save_demo_tokenizer(tmp_path, 256)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode(SENTENCES[1])
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == SENTENCES[1]
    assert sum(bool(p) for p in pieces) > len(pieces) // 2  # text comes as the tokens come


def test_sentencepiece_model_round_trips(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(tmp_path / "tokenizer"), vocab_size=120,
                                   model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=3, pad_id=0,
                                   num_threads=1, minloglevel=2)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 120
    for text in SENTENCES:
        ids = tok.encode(text)
        assert ids[0] == 1
        assert tok.decode(ids) == text


def test_missing_sentencepiece_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.model").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as if not installed
    with pytest.raises(CheckpointError, match="pip install sentencepiece"):
        load_tokenizer(tmp_path)


def test_no_or_bad_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
