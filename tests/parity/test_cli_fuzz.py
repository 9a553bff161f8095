"""Property-based fuzzing of what a user hands `twinlm` (issue 14): config values of every type
and magnitude, symlink layouts around a source, output paths, crafted reference files.

Each property: the command either succeeds or exits 2 with one line naming a documented error
(never a traceback, never "internal error", never exit 1), reads nothing through a link out of
SRC, writes nothing outside DST, and finishes in bounded time; the cases that once hung or grew
without bound run in a child process under RLIMIT_AS. Example counts are fixed and seeded, so
the suite costs the same every run."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.cli import main
from tests.helpers.configs import REPO_ROOT
from weights import load_file, save_file
from weights.config import ConfigError, ModelConfig

def fuzz(examples: int) -> settings:
    """Seeded, bounded: the same `examples` draws every run, whatever the profile."""
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, err: str, command: str, ok: tuple[int, ...] = (0,)) -> None:
    """Success, or exit 2 with one documented line (no traceback, no internal error)."""
    assert code in ok + (2,), (code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"twinlm {command}: error: "), err
    assert "internal error" not in err and "Traceback" not in err, err


def tree(root: Path) -> dict[str, bytes | str]:
    """Every path under `root` (links as their target, files as their bytes), for "nothing else
    was written" checks."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


# ---- config values across types and magnitudes -----------------------------------------------
FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
          "pad_token_id", "bos_token_id", "eos_token_id", "architectures", "torch_dtype", "hidden_act",
          "tie_word_embeddings", "attention_bias", "num_local_experts", "num_experts_per_tok", "sliding_window",
          "layer_types", "rope_scaling", "initializer_range", "num_labels", "model_type", "final_logit_softcapping"]
SCALARS = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 7, 64, 10**4, 10**5, 10**9, 10**12, 2**63, 10**400, -(10**30)]),
    st.sampled_from([0.0, -0.0, 0.5, 1.5, 1e-300, 1e308, math.nan, math.inf, -math.inf]),
    st.booleans(), st.none(), st.sampled_from(["", "silu", "x" * 300, "llama", "float32", "\ud800"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(["rope_type", "factor", "a"]),
                                                                       inner, max_size=3)), max_leaves=6)


@fuzz(150)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=3))
def test_config_values_raise_only_config_error(changes):
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    t0 = time.perf_counter()
    try:
        config = ModelConfig.from_hf_dict({**base, **changes}, source="fuzz/config.json")
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < 400
    else:  # a config that passes is safe to reason about: its totals are computed in O(1)
        from weights.shapes import parameter_totals

        parameter_totals(config, "causal_lm")
        hash(config)  # jit caches on it
    assert time.perf_counter() - t0 < 1.0


@fuzz(25)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=2))
def test_convert_with_a_mutated_config_exits_0_or_2(checkpoint, tmp_path_factory, changes):
    work = tmp_path_factory.mktemp("cfg")
    src = work / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    code, _, err = run(["convert", str(src), str(work / "dst"), "--no-progress"])
    assert_clean(code, err, "convert")
    assert time.perf_counter() - t0 < 5
    assert set(os.listdir(work)) <= {"src", "dst"}  # no staging left behind


# ---- symlink layouts -------------------------------------------------------------------------
SECRET = b"root:x:0:0:SECRET-BYTES:/root:/bin/bash\n" * 4
KINDS = ("file", "link-inside", "link-outside", "dangling", "fifo", "dir-link-outside")


@fuzz(30)
@given(layout=st.fixed_dictionaries({name: st.sampled_from(KINDS) for name in
                                     ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")}),
       follow=st.booleans())
def test_nothing_is_read_through_a_link_out_of_src(checkpoint, tmp_path_factory, layout, follow):
    work = tmp_path_factory.mktemp("links")
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    (outside / "weights").write_bytes((checkpoint / "model.safetensors").read_bytes())
    (outside / "config").write_bytes((checkpoint / "config.json").read_bytes())
    src = work / "src"
    (src / "real").mkdir(parents=True)
    real = {"config.json": (checkpoint / "config.json").read_bytes(),
            "model.safetensors": (checkpoint / "model.safetensors").read_bytes(),
            "tokenizer.json": b'{"tokenizer": true}', "generation_config.json": b"{}"}
    target_outside = {"config.json": outside / "config", "model.safetensors": outside / "weights"}
    for name, kind in layout.items():
        p = src / name
        if kind == "file":
            p.write_bytes(real[name])
        elif kind == "link-inside":
            (src / "real" / name).write_bytes(real[name])
            p.symlink_to(Path("real") / name)
        elif kind == "link-outside":
            p.symlink_to(target_outside.get(name, outside / "secret"))
        elif kind == "dangling":
            p.symlink_to(work / "nowhere")
        elif kind == "fifo":
            os.mkfifo(p)
        else:
            p.symlink_to(outside)
    before = tree(outside)
    t0 = time.perf_counter()
    argv = ["convert", str(src), str(work / "dst"), "--no-progress"] + (["--follow-symlinks"] if follow else [])
    code, out, err = run(argv)
    assert_clean(code, err, "convert")
    assert time.perf_counter() - t0 < 5  # a FIFO never blocks
    assert b"SECRET" not in err.encode() and b"root:x" not in err.encode()
    assert tree(outside) == before  # nothing written outside DST
    assert set(os.listdir(work)) <= {"outside", "src", "dst"}
    if code == 0:
        written = tree(work / "dst")
        assert all(b"SECRET-BYTES" not in v for v in written.values() if isinstance(v, bytes)) or follow
        assert not any(isinstance(v, str) and v.startswith("->") for v in written.values())  # no links copied
        if not follow:  # weights and config came from inside SRC
            assert layout["config.json"] in ("file", "link-inside")
            assert layout["model.safetensors"] in ("file", "link-inside")


# ---- output paths ----------------------------------------------------------------------------
PATHS = ["", ".", "..", "/", "/proc/x/y", "/dev/full", "/dev/null", "{tmp}", "{tmp}/new/deeper/out",
         "{tmp}/file", "{tmp}/file/below", "{tmp}/link", "{tmp}/dangling", "{ckpt}", "{ckpt}/config.json",
         "{ckpt}/inside"]


@fuzz(40)
@given(command=st.sampled_from(["check-json", "check-html", "compare-json", "record", "convert"]),
       path=st.sampled_from(PATHS), force=st.booleans())
def test_output_paths_are_refused_up_front_or_written_inside_dst(checkpoint, tmp_path_factory, monkeypatch,
                                                                  command, path, force):
    import parity.check.pair

    work = tmp_path_factory.mktemp("out")
    (work / "file").write_text("keep")
    (work / "elsewhere").mkdir()
    (work / "link").symlink_to(work / "elsewhere")
    (work / "dangling").symlink_to(work / "gone")
    path = path.format(tmp=work, ckpt=checkpoint)
    ran = []

    def stop(*a, **k):  # reaching the model means the path was accepted: stop there (exit 130)
        ran.append(1)
        raise KeyboardInterrupt

    for target in ("parity.check.pair.load_twins", "parity.record.load_torch"):
        monkeypatch.setattr(target, stop)
    argv = {"check-json": ["check", str(checkpoint), "--json", path],
            "check-html": ["check", str(checkpoint), "--html", path],
            "compare-json": ["compare", str(checkpoint), str(work / "no-ref.safetensors"), "--json", path],
            "record": ["record", str(checkpoint), path, "--seq-len", "4", "--batch", "2"]
            + (["--force"] if force else []),
            "convert": ["convert", str(checkpoint), path, "--no-progress"] + (["--force"] if force else [])}[command]
    before_ckpt, before_work = tree(checkpoint), tree(work)
    code, out, err = run(argv)
    assert code in (0, 2, 130), err
    if code == 2:
        assert_clean(code, err, argv[0])
        assert not ran  # refused before any model was loaded
    assert tree(checkpoint) == before_ckpt  # SRC untouched whatever DST was
    after = tree(work)
    changed = {k for k in set(before_work) | set(after) if before_work.get(k) != after.get(k)}
    target = os.path.relpath(os.path.realpath(path), os.path.realpath(work)) if path else ""
    # Only DST itself, what lies below it, and the directories created above it.
    assert all(k == target or k.startswith(target + os.sep) or target.startswith(k + os.sep) for k in changed), \
        (changed, target)


# ---- crafted reference files -----------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    assert run(["record", str(checkpoint), str(path), "--seq-len", "6", "--batch", "2"])[0] == 0
    return path


MUTATIONS = st.one_of(
    st.tuples(st.just("meta"), st.sampled_from(["format", "framework", "dtype", "head", "versions", "checkpoint",
                                                "fingerprint"]),
              st.sampled_from(["", "x", "{", "[]", "null", "torch", "flax", "float64", "causal_lm", '{"a": {}}',
                               "\u0000", "9" * 5000])),
    st.tuples(st.just("dtype"), st.sampled_from(["input.input_ids", "input.attention_mask", "input.labels",
                                                 "output.logits", "output.hidden_states.1"]),
              st.sampled_from(["float64", "float32", "int8", "bool", "uint64"])),
    st.tuples(st.just("value"), st.sampled_from(["input.input_ids", "input.attention_mask", "input.position_ids"]),
              st.sampled_from([-1, 10**6, 2, 2**40])),
    st.tuples(st.just("rename"), st.sampled_from(["output.hidden_states.1", "input.labels", "output.loss"]),
              st.sampled_from(["output.hidden_states.x", "output.hidden_states.99", "output.bogus", "input.bogus",
                               "other", "output.hidden_states.-1"])),
    st.tuples(st.just("shape"), st.sampled_from(["input.input_ids", "input.attention_mask", "output.logits"]),
              st.sampled_from([(0,), (1, 1), (2, 3, 4), (0, 6), (2, 7)])),
    st.tuples(st.just("drop"), st.sampled_from(["input.input_ids", "input.attention_mask", "output.loss",
                                                "output.logits"]), st.none()),
)


@fuzz(20)
@given(mutations=st.lists(MUTATIONS, min_size=1, max_size=2))
def test_crafted_reference_files_exit_0_1_or_2(checkpoint, reference, tmp_path_factory, mutations):
    from weights import SafetensorsFile

    with SafetensorsFile(reference) as f:
        meta = dict(f.metadata)
    tensors = {k: np.array(v) for k, v in load_file(reference).items()}
    for kind, key, value in mutations:
        if kind == "meta":
            meta[key] = value
        elif key not in tensors:
            continue
        elif kind == "dtype":
            tensors[key] = tensors[key].astype(value)
        elif kind == "value":
            tensors[key] = tensors[key].copy()
            tensors[key].reshape(-1)[0] = value if tensors[key].dtype.kind != "b" else True
        elif kind == "rename":
            tensors[value] = tensors.pop(key)
        elif kind == "shape":
            tensors[key] = np.zeros(value, tensors[key].dtype)
        else:
            tensors.pop(key)
    path = tmp_path_factory.mktemp("crafted") / "ref.safetensors"
    try:
        save_file(tensors, path, meta)
    except Exception:  # noqa: BLE001 - a mutation safetensors itself cannot store: nothing to test
        return
    t0 = time.perf_counter()
    code, out, err = run(["compare", str(checkpoint), str(path)])
    assert_clean(code, err, "compare", ok=(0, 1))
    assert time.perf_counter() - t0 < 30


# ---- what once hung or grew without bound: a child under RLIMIT_AS ---------------------------
_CHILD = r"""
import contextlib, io, json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from parity.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append([code, err.getvalue(), time.perf_counter() - t0])
print(json.dumps(results))
"""


def test_hostile_sizes_are_refused_within_seconds_and_bounded_memory(checkpoint, tmp_path):
    cases = []
    for field, value in (("num_hidden_layers", 10**12), ("num_hidden_layers", 10**4), ("num_local_experts", 10**5),
                         ("vocab_size", 10**12), ("hidden_size", 10**9), ("num_hidden_layers", 1000)):
        d = tmp_path / f"{field}-{value}"
        d.mkdir()
        (d / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
        cfg = json.loads((checkpoint / "config.json").read_text())
        cfg[field] = value
        (d / "config.json").write_text(json.dumps(cfg))
        cases += [["check", str(d)], ["convert", str(d), str(tmp_path / f"out-{field}-{value}"), "--no-progress"]]
    cases += [["check", str(checkpoint), "--seq-len", "1000000000"], ["check", str(checkpoint), "--batch", "1000000000"],
              ["check", str(checkpoint), "--batch", "4096", "--seq-len", "512"]]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for argv, (code, err, seconds) in zip(cases, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert_clean(code, err, argv[0], ok=())
        assert seconds < 5, (argv, seconds)  # refused before torch or JAX is even imported
        assert len(err) < 4000, argv  # one line, not a listing of 89,982 tensors
