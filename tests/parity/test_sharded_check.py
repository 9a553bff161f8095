"""`twinlm check --mesh`: the parity check with the Flax twin sharded over a (simulated) device
mesh — and under torchrun the torch twin over the ranks — passes with the same rows as the
unsharded check, plus each sharded twin against itself. A subprocess: the CLI asks XLA for the
mesh's CPU devices before JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.configs import REPO_ROOT


def test_check_under_torchrun_with_both_twins_sharded(checkpoint, tmp_path):
    """`torchrun --nproc-per-node 2 twinlm check --mesh tensor=2`: the Flax twin sharded over 2
    (simulated) devices, the torch twin over the 2 gloo ranks; the pair rows (every section of the
    unsharded check) compare the two sharded twins and pass, and each twin sharded equals itself
    whole. One launch covers both twins (the torch ranks each run the Flax side too); rank 0
    alone reports."""
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # a free port
    proc = subprocess.run([*torchrun, "-m", "parity.cli", "check", str(checkpoint), "--mesh", "tensor=2",
                           "--seq-len", "4", "--batch", "2", "--no-progress", "--json", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("== ") == 1  # one report, from rank 0
    report = json.loads(out.read_text())
    assert report["meta"]["mesh"] == {"tensor": 2} and report["meta"]["torch_ranks"] == 2
    # The pair rows (torch vs Flax) come from both twins sharded.
    assert report["meta"]["pair"] == {"torch": {"tensor": 2}, "flax": {"tensor": 2}}
    names = [r["name"] for r in report["rows"]]
    for twin in ("flax", "torch"):
        assert f"{twin} sharded vs unsharded (logits)" in names and f"{twin} sharded vs unsharded (loss)" in names
    sections = {r["section"] for r in report["rows"]}
    # Every section of the unsharded check (attention maps and gradients gathered from the ranks).
    assert {"forward", "head", "gradients", "kv cache", "generation"} <= sections
    assert all(r["status"] == "pass" for r in report["rows"])


def test_mesh_flag_errors_are_one_line(checkpoint):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "check", str(checkpoint), "--mesh", "model=2"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--mesh 'model=2'" in proc.stderr.strip().splitlines()[-1]
