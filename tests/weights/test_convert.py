"""`twinlm convert`: bit-exact round trips through the Flax layout, re-typing and re-sharding,
atomic destinations, pickles only on request, and one-line errors from the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weights.safetensors_writer as sio
from parity.cli import main as cli
from tests.helpers.configs import REPO_ROOT, TINY
from weights.checkpoint import FLAX_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, CheckpointReader
from weights.config import ConfigError, ModelConfig
from weights.convert import convert
from weights.errors import (LOAD_ERRORS, CheckpointError, DestinationExistsError, MissingDependencyError,
                            PickleRefusedError)
from weights.names import flax_key, hf_shapes, is_transposed
from weights.safetensors_io import load_file
from weights.synthetic import write_synthetic_checkpoint

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), BF16, np.dtype(np.float16)]
CONFIG = TINY.replace(num_hidden_layers=3, attention_bias=True)  # biases: 1-D tensors, never transposed


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def all_tensors(d: Path) -> dict[str, np.ndarray]:
    with CheckpointReader(d) as r:
        return {k: np.array(r.get(k)) for k in r.keys()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head", ["causal_lm", "question_answering"])
def test_hf_to_flax_to_hf_is_bit_exact(tmp_path, dtype, head):
    src = write_synthetic_checkpoint(tmp_path / "src", CONFIG, head=head, dtype=dtype, max_shard_size="8KB")
    convert(src, tmp_path / "flax", layout="flax", progress=False)
    convert(tmp_path / "flax", tmp_path / "back", max_shard_size="8KB", progress=False)
    convert(src, tmp_path / "direct", max_shard_size="8KB", progress=False)

    original = all_tensors(src)
    flat = load_file(tmp_path / "flax" / FLAX_WEIGHTS_NAME)
    assert set(flat) == {flax_key(k) for k in original}
    for name, arr in original.items():
        f = flat[flax_key(name)]
        assert f.dtype == dtype
        assert (f.T if is_transposed(name) else f).tobytes() == arr.tobytes(), name  # [in, out] kernels
    back = all_tensors(tmp_path / "back")
    assert set(back) == set(original)
    assert all(back[k].dtype == original[k].dtype and back[k].tobytes() == original[k].tobytes() for k in original)
    # Sharding depends on names and sizes only: the round trip writes the very same files.
    assert tree_bytes(tmp_path / "back") == tree_bytes(tmp_path / "direct")
    assert (tmp_path / "back" / SAFE_WEIGHTS_INDEX_NAME).exists()


def test_flax_layout_loads_with_safetensors_flax_and_nnx_update(tmp_path):
    from flax import nnx
    from safetensors.flax import load_file as flax_load_file

    from flax_impl import ForCausalLM

    cfg = CONFIG.replace(attention_bias=False)
    src = write_synthetic_checkpoint(tmp_path / "src", cfg, dtype=BF16)
    convert(src, tmp_path / "flax", layout="flax", progress=False)
    flat = flax_load_file(str(tmp_path / "flax" / FLAX_WEIGHTS_NAME))
    model = ForCausalLM(cfg, dtype=BF16, rngs=nnx.Rngs(0))
    ours = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(flat) == ours
    state = nnx.from_flat_state({tuple(int(p) if p.isdigit() else p for p in k.split(".")): v
                                      for k, v in flat.items()})
    nnx.update(model, state)
    kernel = np.asarray(model.model.layers[2].self_attn.o_proj.kernel[...])
    with CheckpointReader(src) as r:
        assert kernel.tobytes() == np.ascontiguousarray(r.get("model.layers.2.self_attn.o_proj.weight").T).tobytes()


@pytest.mark.parametrize("target", ["float32", "bfloat16", "float16"])
def test_dtype_change_casts_floats_once_and_updates_config(tmp_path, target):
    src = write_synthetic_checkpoint(tmp_path / "src", CONFIG, dtype=np.float32)
    (src / "tokenizer.json").write_text('{"tok": 1}')
    convert(src, tmp_path / "out", dtype=target, progress=False)
    want = np.dtype(ml_dtypes.bfloat16 if target == "bfloat16" else target)
    out, original = all_tensors(tmp_path / "out"), all_tensors(src)
    for k, v in original.items():
        assert out[k].dtype == want and out[k].tobytes() == v.astype(want).tobytes()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == target
    assert ModelConfig.from_pretrained(tmp_path / "out").torch_dtype == target
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"tok": 1}'


def test_same_dtype_keeps_config_bytes(tmp_path):
    src = write_synthetic_checkpoint(tmp_path / "src", CONFIG, dtype=BF16)
    convert(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "config.json").read_bytes() == (src / "config.json").read_bytes()


# ---- the destination is never half-written ---------------------------------------------------
def fail_after(monkeypatch, n: int, exc: BaseException) -> None:
    """Make the (n+1)-th tensor write raise `exc`, whichever way the tensor is written."""
    calls = {"n": 0}

    def failing(real):
        def write(self, *args, **kw):
            calls["n"] += 1
            if calls["n"] > n:
                raise exc
            return real(self, *args, **kw)
        return write

    for method in ("write", "write_from"):
        monkeypatch.setattr(sio.SafetensorsWriter, method, failing(getattr(sio.SafetensorsWriter, method)))


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(28, "No space left on device")], ids=repr)
def test_failure_mid_conversion_leaves_dst_absent_or_unchanged(tmp_path, monkeypatch, exc):
    src = write_synthetic_checkpoint(tmp_path / "src", CONFIG, dtype=BF16, max_shard_size="8KB")
    old = write_synthetic_checkpoint(tmp_path / "old", CONFIG, dtype=np.float32)
    before = tree_bytes(old)
    fail_after(monkeypatch, 5, exc)
    with pytest.raises(type(exc)):
        convert(src, tmp_path / "new", layout="flax", progress=False)
    with pytest.raises(type(exc)):
        convert(src, old, force=True, progress=False)
    assert not (tmp_path / "new").exists()
    assert tree_bytes(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "src"]  # no staging left behind


def test_refuses_existing_dst_without_force(tmp_path):
    src = write_synthetic_checkpoint(tmp_path / "src", CONFIG, dtype=BF16)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(DestinationExistsError, match="--force"):
        convert(src, tmp_path / "dst", progress=False)
    assert tree_bytes(tmp_path / "dst") == {"keep.txt": b"mine"}
    convert(src, tmp_path / "dst", force=True, progress=False)
    assert all_tensors(tmp_path / "dst").keys() == all_tensors(src).keys()


def test_bad_config_is_reported_before_anything_is_written(tmp_path):
    src = write_synthetic_checkpoint(tmp_path / "src", CONFIG, dtype=BF16)
    (src / "config.json").write_text('{"hidden_size": 30, "num_attention_heads": 4}')
    with pytest.raises(ConfigError, match="num_attention_heads"):
        convert(src, tmp_path / "dst", progress=False)
    (src / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


# ---- pickles ---------------------------------------------------------------------------------
def torch_state(shapes, dtype):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def test_pickles_only_when_allowed_and_bit_exact(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ModelConfig(**{**CONFIG.to_hf_dict(), "rope_scaling": None}).save_pretrained(src)
    state = torch_state(hf_shapes(CONFIG), torch.bfloat16)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="pytorch_model.bin"):
        convert(src, tmp_path / "dst", progress=False)
    convert(src, tmp_path / "dst", allow_pickle=True, progress=False)
    out = all_tensors(tmp_path / "dst")
    assert set(out) == set(state)
    for k, t in state.items():
        assert out[k].dtype == BF16 and out[k].tobytes() == t.view(torch.int16).numpy().tobytes()


def test_malicious_pickle_is_refused_by_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    src = write_synthetic_checkpoint(tmp_path / "src", CONFIG, dtype=BF16)
    for p in src.glob("*.safetensors"):
        p.unlink()
    torch.save({"x": Evil()}, src / "model.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert(src, tmp_path / "dst", allow_pickle=True, progress=False)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "dst").exists()


def test_pickle_without_torch_gives_a_clear_error(tmp_path, monkeypatch):
    import weights.convert as wc

    src = tmp_path / "src"
    src.mkdir()
    CONFIG.save_pretrained(src)
    (src / "pytorch_model.bin").write_bytes(b"x")

    def no_torch(name, *a, **k):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(wc.importlib, "import_module", no_torch)
    with pytest.raises(MissingDependencyError, match="needs torch"):
        convert(src, tmp_path / "dst", allow_pickle=True, progress=False)


def test_weights_never_imports_torch_or_jax():
    for path in (REPO_ROOT / "weights").rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not re.match(r"^\s*(import|from)\s+(torch|jax|flax)\b", line), f"{path}: {line}"
    code = ("import sys, weights, weights.convert, weights.synthetic, weights.vq.checkpoint, "
            "weights.shared.rope, weights.shared.generation; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'flax')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# ---- the command line ------------------------------------------------------------------------
def test_cli_converts_and_reports_bad_input_in_one_line(tmp_path, capsys):
    src = write_synthetic_checkpoint(tmp_path / "src", CONFIG, dtype=BF16)
    assert cli(["convert", str(src), str(tmp_path / "out"), "--layout", "flax", "--no-progress"]) == 0
    assert "flax layout" in capsys.readouterr().out
    assert cli(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "Traceback" not in err

    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert cli(["convert", str(src), str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinlm convert: error: ") and err.count("\n") == 1
    assert str(shard) in err and "Traceback" not in err and not (tmp_path / "o2").exists()


def test_cli_ctrl_c_exits_130_and_leaves_dst_absent(tmp_path, monkeypatch, capsys):
    src = write_synthetic_checkpoint(tmp_path / "src", CONFIG, dtype=BF16)
    fail_after(monkeypatch, 3, KeyboardInterrupt())
    assert cli(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 130
    assert "left as it was" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_progress_bar_shows_tensors_and_bytes(tmp_path, capsys):
    src = write_synthetic_checkpoint(tmp_path / "src", CONFIG, dtype=BF16)
    convert(src, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    shapes = hf_shapes(CONFIG)
    kb = sum(np.prod(s) for s in shapes.values()) * 2 / 1000
    assert f"tensor {len(shapes)}/{len(shapes)}" in err and f"{kb:.1f}kB/{kb:.1f}kB" in err


# ---- fuzzing whole checkpoints ---------------------------------------------------------------
_FUZZ_SRC: dict[str, bytes] = {}


def _fuzz_source(tmp_path_factory) -> dict[str, bytes]:
    """A small sharded checkpoint's files (built once): config, index and shards."""
    if not _FUZZ_SRC:
        d = write_synthetic_checkpoint(tmp_path_factory.mktemp("fuzzsrc") / "c",
                                       CONFIG.replace(num_hidden_layers=1), dtype=BF16, max_shard_size="4KB")
        _FUZZ_SRC.update({p.name: p.read_bytes() for p in sorted(d.iterdir())})
    return _FUZZ_SRC


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_checkpoints_convert_or_fail_with_one_documented_error(tmp_path_factory, data):
    files = _fuzz_source(tmp_path_factory)
    target = data.draw(st.sampled_from(sorted(files)), label="file")
    raw = bytearray(files[target])
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)), label="pos")
        op = data.draw(st.sampled_from(["set", "truncate", "delete"]), label="op")
        if op == "set" and raw:
            raw[pos] = data.draw(st.integers(0, 255), label="byte")
        elif op == "truncate":
            del raw[pos:]
        elif raw:
            del raw[pos]
    root = tmp_path_factory.mktemp("fuzz")
    (root / "src").mkdir()
    for name, content in files.items():
        (root / "src" / name).write_bytes(bytes(raw) if name == target else content)
    try:
        convert(root / "src", root / "dst", progress=False, fsync=False)
    except LOAD_ERRORS as e:
        assert "\n" not in str(e) and str(root / "src") in str(e)  # one line naming the file
        assert not (root / "dst").exists()
        return
    # Accepted: then every tensor reads back as the (possibly mutated) source holds it.
    src, dst = all_tensors(root / "src"), all_tensors(root / "dst")
    assert set(src) == set(dst) and all(src[k].tobytes() == dst[k].tobytes() for k in src)
