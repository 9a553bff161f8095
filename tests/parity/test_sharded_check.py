"""`twinlm check --mesh`: the parity check with the Flax twin sharded over a (simulated) device
mesh passes with the same rows as the unsharded check, plus the sharded twin against itself.
A subprocess: the CLI asks XLA for the mesh's CPU devices before JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.configs import REPO_ROOT


def test_check_with_the_flax_twin_on_a_data_tensor_mesh(checkpoint, tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "check", str(checkpoint), "--mesh", "data=2,tensor=4",
                           "--skip", "kv-cache", "--skip", "generation", "--seq-len", "4", "--batch", "2",
                           "--no-progress", "--json", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["mesh"] == {"data": 2, "tensor": 4}
    names = [r["name"] for r in report["rows"]]
    assert "flax sharded vs unsharded (logits)" in names and "flax sharded vs unsharded (loss)" in names
    sections = {r["section"] for r in report["rows"]}
    assert {"forward", "head", "gradients"} <= sections
    assert all(r["status"] == "pass" for r in report["rows"])


def test_mesh_flag_errors_are_one_line(checkpoint):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "check", str(checkpoint), "--mesh", "model=2"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--mesh 'model=2'" in proc.stderr.strip().splitlines()[-1]
