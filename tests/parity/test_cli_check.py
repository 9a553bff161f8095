"""`twinlm check`: exit 0 when the twins agree, 1 on a parity failure (a twin broken in one
layer), 2 on bad input, with a message naming what is wrong."""

from __future__ import annotations

import json

import pytest

import parity.check.pair
from parity.cli import main
from parity.testing import break_layer
from parity.tolerances import TOLERANCES
from tests.helpers.configs import TINY_DEMO


def test_check_passes_and_writes_json_and_html(checkpoint, tmp_path, capsys):
    code = main(["check", str(checkpoint), "--dtype", "float32",
                 "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[forward]" in out and "[gradients]" in out and "[kv cache]" in out and "\nPASS" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] and data["dtype"] == "float32"
    statuses = {r["status"] for r in data["rows"]}
    assert statuses <= {"pass", "n/a"} and "pass" in statuses
    # Every gradient is in the JSON, one row per parameter (the table folds them per layer).
    assert sum(r["section"] == "gradients" for r in data["rows"]) == 2 + 9 * TINY_DEMO.num_hidden_layers + 1
    page = (tmp_path / "r.html").read_text()
    assert "<svg" in page and "model.layers.2 + model.norm (output)" in page


def test_check_fast_compares_the_fused_attention_kernels_and_says_what_it_left_out(checkpoint, tmp_path, capsys,
                                                                                   monkeypatch):
    """`--fast`: both twins really run their fused kernels (counted), every row but the attention
    maps is compared, and the report names what the kernels could not give."""
    import flax_impl.layers.attention as flax_attention
    import torch_impl.layers.attention as torch_attention

    calls = {"torch": 0, "flax": 0}
    for twin, module in (("torch", torch_attention), ("flax", flax_attention)):
        def counted(*args, _real=module.attention_fast, _twin=twin, **kwargs):
            calls[_twin] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, "attention_fast", counted)
    code = main(["check", str(checkpoint), "--fast", "--skip", "gradients", "--skip", "generation", "--seq-len", "6",
                 "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert calls["torch"] > 0 and calls["flax"] > 0
    data = json.loads((tmp_path / "r.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert not any("attention weights" in n for n in names)
    assert f"model.layers.{TINY_DEMO.num_hidden_layers - 1} + model.norm (output)" in names
    assert data["skipped"]["attention weights"] == "fast attention: the fused kernels return no maps"
    assert data["meta"]["describe"]["run on"].endswith("attention fast")


def test_check_exits_1_and_names_the_broken_layer(checkpoint, monkeypatch, capsys, tmp_path):
    real = parity.check.pair.load_twins

    def broken(*args, **kwargs):
        twins = real(*args, **kwargs)
        break_layer(twins.flax_model, 1)
        return twins

    monkeypatch.setattr(parity.check.pair, "load_twins", broken)
    code = main(["check", str(checkpoint), "--dtype", "float32", "--skip", "generation",
                 "--html", str(tmp_path / "r.html"), "--explain", str(tmp_path / "explain")])
    out = capsys.readouterr().out
    assert code == 1
    assert "first divergence: model.layers.1 (output)" in out
    assert "model.layers.0 (output)" in out.split("FAIL")[0]  # layer 0 printed, and before any FAIL
    # The HTML report sends the first divergence to the decoder layer's explain page, written beside it.
    page = (tmp_path / "r.html").read_text()
    failures = page[page.index("id='failures'"):]
    assert "model.layers.1 (output) → <a href='explain/decoder-layer.html#measured'>" in page
    assert failures.index("model.layers.1 (output)") < failures.index("logits")
    assert "id='measured'" in (tmp_path / "explain" / "decoder-layer.html").read_text()


def test_tolerance_table(capsys):
    assert main(["check", "--tolerances"]) == 0
    out = capsys.readouterr().out
    for dtype, tol in TOLERANCES.items():
        assert dtype in out and tol.reason[:30] in out


def _corrupt(directory, tmp_path, what):
    d = tmp_path / what
    d.mkdir()
    for f in directory.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    if what == "bad-json":
        (d / "config.json").write_text("{not json")
    elif what == "bad-field":
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_attention_heads"] = 5
        (d / "config.json").write_text(json.dumps(cfg))
    elif what == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif what == "wrong-shape":
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 48
        (d / "config.json").write_text(json.dumps(cfg))
    elif what == "no-weights":
        (d / "model.safetensors").unlink()
    return d


@pytest.mark.parametrize("what, words", [
    ("bad-json", ["config.json", "JSON"]),
    ("bad-field", ["num_attention_heads"]),
    ("truncated", ["model.safetensors"]),
    ("wrong-shape", ["mlp.gate_proj.weight"]),
    ("no-weights", ["no-weights"]),
])
def test_bad_checkpoints_exit_2_with_a_clear_message(checkpoint, tmp_path, capsys, what, words):
    bad = _corrupt(checkpoint, tmp_path, what)
    assert main(["check", str(bad), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    # The error is the last line (a readable checkpoint first gets its mode line: whole or streamed).
    assert err.splitlines()[-1].startswith("twinlm check: error: ") and "Traceback" not in err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("argv, words", [
    (["check", "/no/such/checkpoint"], ["/no/such/checkpoint", "not found"]),
    (["check"], ["missing DIR"]),
    (["check", "{ckpt}", "--batch", "1"], ["--batch must be >= 2"]),
])
def test_bad_arguments_exit_2(checkpoint, capsys, argv, words):
    argv = [a.replace("{ckpt}", str(checkpoint)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("argv", [["check", "x", "--dtype", "int8"], ["check", "x", "--seq-len", "0"],
                                  ["check", "x", "--skip", "everything"], ["nonsense"]])
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
