"""`twinlm demo`: builds, saves, converts, loads and checks; the embedded list covers every
head; bad dtypes exit 2."""

from __future__ import annotations

import json


import parity.demo
from parity.cli import main
from parity.demo import DEMO_MODELS, DemoModel
from parity.inputs import HEADS
from tests.helpers.configs import TINY_DEMO
from weights.families import FAMILIES


def test_demo_round_trip_on_a_small_model(tmp_path, monkeypatch, capsys):
    # The embedded list is checked in CI by `make demo`; here one small model, one dtype.
    monkeypatch.setattr(parity.demo, "DEMO_MODELS", [DemoModel("tiny-causal-lm", "causal_lm", TINY_DEMO)])
    assert main(["demo", "--out", str(tmp_path), "--dtypes", "float64"]) == 0
    out = capsys.readouterr().out
    assert "== tiny-causal-lm (float64) ==" in out and "all checks PASS" in out
    assert "worst relative error per dtype" in out
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "tiny-causal-lm" / "model.safetensors").is_file()
    assert (ckpts / "tiny-causal-lm-flax" / "flax_model.safetensors").is_file()  # through the converter
    (report,) = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and report["meta"]["flax_checkpoint"].endswith("tiny-causal-lm-flax")
    assert str((tmp_path / "parity.html").resolve()) in out
    # The explain site, with the demo's figures, next to the report; the report links into it.
    assert str((tmp_path / "explain" / "index.html").resolve()) in out
    assert "tiny-causal-lm (float64)" in (tmp_path / "explain" / "attention.html").read_text()
    assert "href='explain/index.html'" in (tmp_path / "parity.html").read_text()


def test_embedded_demo_covers_every_head_and_family():
    assert {m.head for m in DEMO_MODELS} == set(HEADS)
    assert {m.config.model_type for m in DEMO_MODELS} == set(FAMILIES)
    assert len({m.name for m in DEMO_MODELS}) == len(DEMO_MODELS)


def test_demo_rejects_unknown_dtypes(capsys):
    assert main(["demo", "--dtypes", "float32,int8"]) == 2
    assert "int8" in capsys.readouterr().err
