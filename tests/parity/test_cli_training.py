"""`twinlm check DIR --train-steps K`: K AdamW steps in both twins from the checkpoint; per step
loss, grad norm and every parameter, in text and JSON; mixed precision by --param-dtype; bad
values exit 2."""

from __future__ import annotations

import json

import parity.check.training
from parity.cli import main
from parity.report import Report
from tests.helpers.configs import TINY_DEMO


def test_train_steps_report_every_parameter_after_each_step(checkpoint, tmp_path, capsys):
    code = main(["check", str(checkpoint), "--train-steps", "2", "--batch", "4", "--accumulation-steps", "2",
                 "--json", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[step 1]" in out and "[step 2]" in out and "grad norm (before clipping)" in out and "\nPASS" in out
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["passed"] and data["meta"]["hparams"]["warmup_steps"] == 1
    n_params = 2 + 9 * TINY_DEMO.num_hidden_layers + 1
    for step in (1, 2):
        rows = [r for r in data["rows"] if r["section"] == f"step {step}" and r["quantity"] == "parameters"]
        assert len(rows) == n_params and all(r["tolerance"] == 1e-4 for r in rows)


def test_train_steps_bad_values_exit_2(checkpoint, capsys):
    assert main(["check", str(checkpoint), "--train-steps", "1", "--batch", "3", "--accumulation-steps", "2"]) == 2
    assert "--accumulation-steps 2 must divide --batch 3" in capsys.readouterr().err


def test_train_steps_take_mixed_precision_and_refuse_float16(checkpoint, capsys, monkeypatch):
    """--dtype bfloat16 --param-dtype float32 reaches the training check (float32 master weights:
    its run is tests/twins/test_training.py's mixed-precision test); float16 parameters are refused
    by name before any model is built (AdamW gives NaN there)."""
    for args in (["--dtype", "float16"], ["--dtype", "float32", "--param-dtype", "float16"]):
        assert main(["check", str(checkpoint), "--train-steps", "1", *args]) == 2
        assert "training with float16 parameters gives NaN" in capsys.readouterr().err
    seen = {}

    def fake(directory, dtype, **kwargs):
        seen.update(kwargs, dtype=dtype)
        return Report("fake", dtype, "causal_lm")

    monkeypatch.setattr(parity.check.training, "check_training", fake)
    assert main(["check", str(checkpoint), "--train-steps", "2", "--dtype", "bfloat16", "--param-dtype", "float32"]) == 0
    assert seen["dtype"] == "bfloat16" and seen["param_dtype"] == "float32" and seen["steps"] == 2
