"""`twinlm record` / `twinlm compare`: references written with inputs and versions, compared
in either framework, a changed checkpoint caught as a regression, bad references refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity.cli import main
from parity.record import FORMAT
from tests.helpers.configs import TINY_DEMO
from weights import SafetensorsFile, load_file, save_file


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    assert main(["record", str(checkpoint), str(path), "--dtype", "float64"]) == 0
    return path


def test_reference_holds_inputs_outputs_and_versions(reference):
    with SafetensorsFile(reference) as f:
        meta, names = f.metadata, set(f.keys())
    assert meta["format"] == FORMAT and meta["framework"] == "torch" and meta["dtype"] == "float64"
    assert set(json.loads(meta["versions"])) >= {"torch", "jax", "flax", "twinlm", "numpy"}
    assert {"input.input_ids", "input.attention_mask", "input.position_ids", "input.labels",
            "output.logits", "output.loss"} <= names
    assert {f"output.hidden_states.{i}" for i in range(TINY_DEMO.num_hidden_layers + 1)} <= names
    tensors = load_file(reference)
    assert tensors["output.logits"].shape == (3, 16, TINY_DEMO.vocab_size) and tensors["output.logits"].dtype == np.float64


@pytest.mark.parametrize("extra", [[], ["--framework", "flax"], ["--rtol", "0", "--atol", "0"]])
def test_compare_passes_on_the_same_checkpoint(checkpoint, reference, capsys, extra):
    code = main(["compare", str(checkpoint), str(reference)] + extra)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "model.layers.2 + model.norm (output)" in out and "\nPASS" in out  # named as `check` names it
    if extra and extra[0] == "--framework":
        assert "compared with the flax twin" in out


def test_compare_catches_a_changed_checkpoint(checkpoint, reference, tmp_path, capsys):
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    tensors = {k: np.array(v) for k, v in load_file(checkpoint / "model.safetensors").items()}
    tensors["model.layers.1.mlp.down_proj.weight"] *= np.float32(1.001)
    save_file(tensors, changed / "model.safetensors", {"format": "pt"})
    assert main(["compare", str(changed), str(reference), "--json", str(tmp_path / "c.json"),
                 "--html", str(tmp_path / "c.html")]) == 1
    out = capsys.readouterr().out
    # Layer 1's output is the first recorded tensor the change reaches.
    assert "first divergence: model.layers.1 (output)" in out
    assert "model.layers.1 (output) → <span" in (tmp_path / "c.html").read_text()  # the HTML report says so too
    data = json.loads((tmp_path / "c.json").read_text())
    assert [r["name"] for r in data["rows"] if r["status"] == "pass"][:2] == [
        "model.embed_tokens (embeddings)", "model.layers.0 (output)"]
    assert data["meta"]["warnings"] and "recorded from a different checkpoint" in data["meta"]["warnings"][0]
    # A loose elementwise bound accepts the same change.
    assert main(["compare", str(changed), str(reference), "--rtol", "0.1", "--atol", "0.1"]) == 0


def test_bad_references_exit_2(checkpoint, tmp_path, capsys):
    assert main(["compare", str(checkpoint), str(tmp_path / "missing.safetensors")]) == 2
    assert "reference file not found" in capsys.readouterr().err
    # A checkpoint file is a safetensors file, but not a reference.
    assert main(["compare", str(checkpoint), str(checkpoint / "model.safetensors")]) == 2
    assert "not a twinlm reference file" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x01\x02")
    assert main(["compare", str(checkpoint), str(junk)]) == 2
    assert "junk.safetensors" in capsys.readouterr().err
    assert main(["record", str(tmp_path / "nope"), str(tmp_path / "r.safetensors")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
