"""`twinlm convert` checks what it writes and cleans up after crashes: strict against the config,
stale staging of a killed run removed at the next run, `--force` without a moment where DST is
absent, a source truncated mid-conversion a clean error (not SIGBUS)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from tests.helpers.configs import REPO_ROOT, TINY
from weights.convert import convert
from weights.errors import CheckpointError, MissingKeysError, ShardIndexError, UnexpectedKeysError
from weights.safetensors_io import load_file
from weights.safetensors_writer import save_file
from weights.staging import _try_lock, clean_stale, exchange, staging_siblings
from weights.synthetic import write_synthetic_checkpoint

BF16 = np.dtype(ml_dtypes.bfloat16)


def _rewrite(d, change):
    tensors = {k: np.array(v) for k, v in load_file(d / "model.safetensors").items()}
    change(tensors)
    save_file(tensors, d / "model.safetensors", {"format": "pt"})


@pytest.mark.parametrize("what, error", [
    ("extra", UnexpectedKeysError), ("missing", MissingKeysError), ("int", CheckpointError),
    ("reshaped", CheckpointError), ("empty-index", CheckpointError), ("unlisted-shard", CheckpointError)])
def test_strict_by_default(tmp_path, what, error):
    src = write_synthetic_checkpoint(tmp_path / "src", TINY, dtype=BF16,
                                     max_shard_size="4KB" if what in ("empty-index", "unlisted-shard") else "5GB")
    if what == "extra":
        _rewrite(src, lambda t: t.update({"junk": np.zeros(10**4, np.uint8)}))
    elif what == "missing":
        _rewrite(src, lambda t: t.pop("lm_head.weight"))
    elif what == "int":
        _rewrite(src, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].view(np.int16)}))
    elif what == "reshaped":
        _rewrite(src, lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1]}))
    else:
        index = json.loads((src / "model.safetensors.index.json").read_text())
        if what == "empty-index":
            index["weight_map"] = {}
        else:
            last = sorted(set(index["weight_map"].values()))[-1]
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(error):
        convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()
    if what == "extra":  # passed through on purpose
        result = convert(src, tmp_path / "dst", progress=False, strict=False)
        assert result.passed_through == ("junk",) and "junk" in load_file(tmp_path / "dst" / "model.safetensors")


_KILLED = r"""
import os, sys, time
import weights.safetensors_writer as w
real = w.SafetensorsWriter.write
def slow(self, *a, **k):
    real(self, *a, **k)
    open(sys.argv[3], "w").close()  # tell the parent a tensor is staged
    time.sleep(60)
w.SafetensorsWriter.write = slow
w.SafetensorsWriter.write_from = lambda self, name, *a: slow(self, name, __import__("numpy").zeros(
    self.specs[name].shape, self.specs[name].dtype))
from weights.convert import convert
convert(sys.argv[1], sys.argv[2], progress=False, fsync=False)
"""


def test_staging_of_a_killed_run_is_removed_at_the_next_run(tmp_path):
    src = write_synthetic_checkpoint(tmp_path / "src", TINY, dtype=BF16)
    marker = tmp_path / "staged"
    child = subprocess.Popen([sys.executable, "-c", _KILLED, str(src), str(tmp_path / "dst"), str(marker)],
                             cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    stale = staging_siblings(tmp_path / "dst")
    assert len(stale) == 1 and not (tmp_path / "dst").exists()  # what kill -9 leaves
    # A staging directory whose writer is alive (its lock held) is left alone.
    live = tmp_path / ".dst.tmp-live0000"
    live.mkdir()
    fd = _try_lock(tmp_path / ".dst.tmp-live0000.lock")
    try:
        result = convert(src, tmp_path / "dst", progress=False)
        assert result.cleaned == (str(stale[0]),) and live.exists()
    finally:
        os.close(fd)
    assert clean_stale(tmp_path / "dst") == ([live], [])
    assert sorted(os.listdir(tmp_path)) == ["dst", "src", "staged"]


def test_force_replaces_without_a_moment_where_dst_is_absent(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("a")
    b.write_text("b")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) not available here: the documented two-rename fallback runs")
    assert (b / "x").read_text() == "a" and a.read_text() == "b"
    src = write_synthetic_checkpoint(tmp_path / "src", TINY, dtype=np.float32)
    dst = write_synthetic_checkpoint(tmp_path / "dst", TINY, dtype=BF16)
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(os.path.exists(dst / "model.safetensors"))

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(3):
            convert(src, dst, force=True, progress=False, fsync=False)
    finally:
        stop.set()
        t.join()
    assert seen and all(seen)
    assert load_file(dst / "model.safetensors")["model.norm.weight"].dtype == np.float32


def test_force_fallback_without_exchange(tmp_path, monkeypatch):
    import weights.staging

    monkeypatch.setattr(weights.staging, "exchange", lambda a, b: False)
    src = write_synthetic_checkpoint(tmp_path / "src", TINY, dtype=np.float32)
    dst = write_synthetic_checkpoint(tmp_path / "dst", TINY, dtype=BF16)
    convert(src, dst, force=True, progress=False)
    assert load_file(dst / "model.safetensors")["model.norm.weight"].dtype == np.float32
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]


_TRUNCATED = r"""
import os, sys
import weights.safetensors_io as io, weights.safetensors_writer as w
def cutting(real, after):
    calls = []
    def truncating(self, *a, **k):
        calls.append(None)
        if len(calls) > after:
            os.truncate(sys.argv[1] + "/model.safetensors", 4096)  # another process cuts the source short
        return real(self, *a, **k)
    return truncating
if sys.argv[3] == "read-ahead":
    # Cut by the second read, the first made ahead on the converter's read thread: the error comes
    # from that thread or from the next tensor's check, whichever sees the cut first; both are clean.
    io.SafetensorsFile.read = cutting(io.SafetensorsFile.read, 1)
else:
    for method in ("write", "write_from"):
        setattr(w.SafetensorsWriter, method, cutting(getattr(w.SafetensorsWriter, method), 0))
from parity.cli import main
sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--no-progress"] + sys.argv[4:]))
"""


@pytest.mark.parametrize("when, extra", [("write", []), ("write", ["--dtype", "float32"]),
                                         ("write", ["--layout", "flax"]), ("read-ahead", ["--layout", "flax"])],
                         ids=["kernel-copy", "cast", "transpose", "read-ahead"])
def test_a_source_truncated_mid_conversion_is_a_clean_error(tmp_path, when, extra):
    src = write_synthetic_checkpoint(tmp_path / "src", TINY.replace(vocab_size=4096), dtype=BF16)
    proc = subprocess.run([sys.executable, "-c", _TRUNCATED, str(src), str(tmp_path / "dst"), when, *extra],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # not -7 (SIGBUS)
    assert "truncated" in proc.stderr or "changed" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no DST, no staging


_TERMINATED = r"""
import os, signal, sys, time
import weights.safetensors_writer as w
real = w.SafetensorsWriter.write_from
def slow(self, *a, **k):
    real(self, *a, **k)
    open(sys.argv[3], "w").close()
    time.sleep(60)
w.SafetensorsWriter.write_from = slow
from parity.cli import main
sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--no-progress"]))
"""


def test_sigterm_during_convert_removes_its_staging_at_once(tmp_path):
    src = write_synthetic_checkpoint(tmp_path / "src", TINY, dtype=BF16)
    marker = tmp_path / "staged"
    child = subprocess.Popen([sys.executable, "-c", _TERMINATED, str(src), str(tmp_path / "dst"), str(marker)],
                             cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    err = child.communicate(timeout=60)[1].decode()
    assert child.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["src", "staged"]  # no DST, no staging, no lock
