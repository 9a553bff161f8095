"""The exit status of `twinlm` as a contract: 0 success, 1 a parity failure or regression and
nothing else, 2 anything else in one line on stderr (never a traceback, never "internal
error"); inputs and output paths refused before any work; --version, help examples and exit
codes on every subcommand; a closed pipe ends the output, not the run; non-finite outputs fail."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

import parity.check
import parity.check.pair
from parity.cli import build_parser, main
from tests.helpers.configs import REPO_ROOT, TINY_DEMO
from weights import load_file, save_file

COMMANDS = ("convert", "check", "demo", "record", "compare", "explain", "generate")


def run(argv: list[str]) -> tuple[int, str, str]:
    """`twinlm argv` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's --help / --version / usage errors
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, command: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"twinlm {command}: error: "), err
    assert "internal error" not in err and "Traceback" not in err


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def no_model(monkeypatch):
    """Make loading a model an error: what must be refused up front is then refused before it."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was refused")
    monkeypatch.setattr(parity.check.pair, "load_twins", refuse)
    monkeypatch.setattr("parity.record.load_torch", refuse)
    monkeypatch.setattr("parity.record.load_flax", refuse)


# ---- --version, help -------------------------------------------------------------------------
def test_version_and_help_carry_examples_and_exit_codes():
    code, out, _ = run(["--version"])
    assert code == 0 and out.startswith("twinlm ") and "torch" in out and "jax" in out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "examples:" in text and f"twinlm {name}" in text.split("examples:")[1], name
        assert "exit status:" in text and "  2  " in text, name
    text = build_parser().format_help()
    assert "examples:" in text and "exit status" in text


# ---- 2: usage and input errors, one line, before any work -----------------------------------
@pytest.mark.parametrize("argv", [
    ["check", "{ckpt}", "--seed", "-1"],
    ["check", "{ckpt}", "--batch", "0"],
    ["check", "{ckpt}", "--dtype", "int8"],
    ["check"],
    ["check", "{ckpt}", "--seq-len", "1000000000"],
    ["check", "{ckpt}", "--batch", "1000000000"],
    ["check", "{ckpt}", "--seq-len", "600"],  # past max_position_embeddings (512)
    ["check", "{tmp}/missing"],
    ["check", "{ckpt}", "--json", "{tmp}"],
    ["check", "{ckpt}", "--json", "/proc/x/y.json"],
    ["check", "{ckpt}", "--html", "{ckpt}/config.json/x.html"],
    ["check", "{ckpt}", "--json", "{tmp}/a.json", "--html", "{tmp}/a.json"],
    ["check", "{ckpt}", "--json", ""],
    ["check", "{ckpt}", "--json", "/dev/full"],
    ["demo", "--dtypes", ""],
    ["demo", "--dtypes", "float32,,bfloat16"],
    ["demo", "--out", "{ckpt}/config.json"],
    ["record", "{ckpt}", "{tmp}"],
    ["record", "{ckpt}", "{ckpt}/config.json"],  # exists: --force needed
    ["record", "{ckpt}", "/proc/x/ref.safetensors"],
    ["compare", "{ckpt}", "{ckpt}/model.safetensors"],
    ["compare", "{ckpt}", "{tmp}/nope.safetensors", "--rtol", "nan"],
    ["compare", "{ckpt}", "{tmp}/nope.safetensors", "--json", "{tmp}"],
    ["convert", "{ckpt}", ""],
    ["convert", "{ckpt}", "."],
    ["convert", "{ckpt}", "{ckpt}"],
    ["convert", "{ckpt}", "{ckpt}/model.safetensors", "--force"],
    ["convert", "{ckpt}", "{ckpt}/sub"],
    ["convert", "{ckpt}", "{tmp}/..", "--force"],
    ["convert", "{ckpt}", "{tmp}/out", "--max-shard-size", "-1"],
])
def test_bad_input_exits_2_in_one_line_before_any_work(checkpoint, tmp_path, monkeypatch, argv):
    no_model(monkeypatch)
    before = sorted(os.listdir(checkpoint))
    argv = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in argv]
    t0 = time.perf_counter()
    code, out, err = run(argv)
    assert_one_line_error(code, err, argv[0])
    assert time.perf_counter() - t0 < 10
    assert sorted(os.listdir(checkpoint)) == before  # the source is never touched


def test_exit_1_means_a_parity_failure_and_only_that(checkpoint, monkeypatch):
    # The real failing check (a broken layer) is tests/parity/test_cli_check.py's; here, without a
    # compilation: a failing report is 1, a crash inside the check (a bug, not a regression) is 2.
    from parity.compare import Comparison
    from parity.report import Report, Row

    failing = Report("t", "float32", "causal_lm", [Row("head", "logits", Comparison("logits", 1.0, 1.0, (0,), 1e-5, False))])
    monkeypatch.setattr(parity.check, "check_checkpoint", lambda *a, **k: failing)
    code, out, err = run(["check", str(checkpoint)])
    assert code == 1 and "FAIL" in out and err == ""
    monkeypatch.setattr(parity.check, "check_checkpoint", lambda *a, **k: 1 / 0)
    code, out, err = run(["check", str(checkpoint)])
    assert code == 2 and "internal error: ZeroDivisionError" in err and len(err.strip().splitlines()) == 1


def test_skipped_sections_are_recorded_everywhere(checkpoint, tmp_path):
    # kv-cache skipped too: decoding step by step is most of a small check's time.
    code, out, _ = run(["check", str(checkpoint), "--skip", "gradients", "--skip", "generation",
                        "--skip", "kv-cache", "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")])
    assert code == 0
    verdict = [line for line in out.splitlines() if line.startswith("PASS")][0]
    assert "incomplete" in verdict and "gradients (--skip gradients)" in verdict
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["complete"] is False and data["skipped"] == {"gradients": "--skip gradients",
                                                            "kv cache": "--skip kv-cache",
                                                            "generation": "--skip generation"}
    assert "incomplete" in (tmp_path / "r.html").read_text()


def test_nonfinite_weights_are_refused_by_name_or_fail_the_check(checkpoint, tmp_path):
    bad = copy_checkpoint(checkpoint, tmp_path / "nan")
    tensors = {k: np.array(v) for k, v in load_file(bad / "model.safetensors").items()}
    tensors["model.embed_tokens.weight"][:] = np.nan
    save_file(tensors, bad / "model.safetensors", {"format": "pt"})
    code, _, err = run(["check", str(bad)])
    assert_one_line_error(code, err, "check")
    assert "model.embed_tokens.weight" in err and "--allow-nonfinite-weights" in err
    code, out, err = run(["check", str(bad), "--allow-nonfinite-weights", "--skip", "gradients",
                          "--skip", "generation", "--skip", "kv-cache"])
    verdict = next(line for line in out.splitlines() if line.startswith("FAIL"))  # a timings line follows
    assert code == 1 and "both twins produced non-finite values at model.embed_tokens" in verdict


def test_nonfinite_rope_parameter_is_refused(checkpoint, tmp_path):
    bad = copy_checkpoint(checkpoint, tmp_path / "rope")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": float("nan")}
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(["check", str(bad)])
    assert_one_line_error(code, err, "check")
    assert "original_max_position_embeddings" in err


def test_record_refuses_to_overwrite_without_force(checkpoint, tmp_path):
    ref = tmp_path / "ref.safetensors"
    assert run(["record", str(checkpoint), str(ref)])[0] == 0
    code, _, err = run(["record", str(checkpoint), str(ref)])
    assert_one_line_error(code, err, "record")
    assert "--force" in err
    assert run(["record", str(checkpoint), str(ref), "--force", "--seed", "3"])[0] == 0


def test_a_closed_pipe_ends_the_output_not_the_run():
    # The reader is gone before twinlm writes (`twinlm ... | head -0`): no traceback, status kept.
    proc = subprocess.Popen([sys.executable, "-m", "parity.cli", "check", "--tolerances"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
