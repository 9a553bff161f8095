"""`twinlm generate` end to end on the demo checkpoint (saved with the demo's tokenizer): text in,
streamed text out, the same text from both twins (sampled: greedy streams are held equal by
tests/twins/test_serving.py; each Flax run compiles its runner)."""

from __future__ import annotations

import pytest

from parity.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_streams_the_same_text_from_both_twins(checkpoint, capsys):
    assert (checkpoint / "tokenizer.json").is_file()
    sampling = ["--sample", "--temperature", "1.5", "--top-p", "0.9", "--seed", "3", "--filter-order", "grok"]
    texts = []
    for framework in ("torch", "flax"):
        code, out, err = run(capsys, checkpoint, "--prompt", "The cache keeps", "--framework", framework,
                             "--max-new-tokens", 12, "--ignore-eos", *sampling)
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1]
    assert len(texts[0].strip()) > 0


def test_generate_errors_are_one_line(checkpoint, capsys, tmp_path):
    code, _, err = run(capsys, checkpoint, "--prompt-ids", "1,2,999")
    assert code == 2 and "999" in err and "vocabulary" in err
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    code, _, err = run(capsys, tmp_path, "--prompt", "hello")
    assert code == 2 and "twinlm generate: error" in err
