"""Sharded equals unsharded: each twin cut by its partition table on its framework's own engine
(JAX SPMD on 8 simulated CPU devices; torch.distributed on gloo) against itself on one device,
in float64. The multi-device runs are subprocesses (the device count, and the process group,
must be set before the framework starts); the table itself is checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.configs import REPO_ROOT
from weights.partition import parse_mesh, partition_spec


def _run(module: str, *args: str, timeout: int = 300) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return rows


def test_flax_sharded_equals_unsharded_on_three_meshes(tmp_path):
    """Meshes (8,) fsdp, (2, 4) data x tensor, (1, 8) fsdp x tensor: the model loaded sharded
    (each device reading its slice), every parameter's `.sharding` as the table says, and the
    forward logits, loss, every gradient and greedy tokens equal to the one-device run to 1e-12;
    the layers scanned (`scan_layers`) on the (2, 4) mesh give the same; then training steps on the
    (2, 4) mesh equal to one device's."""
    rows = _run("tests.helpers.sharded_flax", str(tmp_path / "ckpt"))
    *rows, scanned, train = rows
    assert scanned["scan_layers"] and scanned["ok"] and scanned["tokens_equal"], scanned
    assert max(scanned["logits_err"], scanned["grad_err"]) <= 1e-12, scanned
    assert [r["mesh"] for r in rows] == [{"fsdp": 8}, {"data": 2, "tensor": 4}, {"fsdp": 1, "tensor": 8}]
    # K = 3 train_step updates (2 micro-batches each) on the data x tensor mesh: same losses and
    # parameters as one device, shardings kept.
    assert train["train_steps"] == 3 and train["ok"] and train["wrong_sharding"] == [], train
    assert max(train["loss_err"], train["param_err"]) <= 1e-12, train
    for r in rows:
        assert r["ok"], r
        assert r["wrong_sharding"] == [] and r["split"] == 16 and r["tokens_equal"], r
        assert max(r["logits_err"], r["loss_err"], r["grad_err"]) <= 1e-12, r


def test_both_twins_state_the_same_table():
    from flax_impl.sharding import PARTITION_RULES as flax_rules
    from torch_impl.sharding import PARTITION_RULES as torch_rules

    assert flax_rules == torch_rules


def test_partition_spec_reads_the_table():
    from flax_impl.sharding import PARTITION_RULES as rules

    mesh = {"data": 2, "tensor": 4}
    assert partition_spec("model.layers.3.self_attn.q_proj.weight", (32, 16), mesh, rules) == ("tensor", None)
    assert partition_spec("model.layers.0.mlp.down_proj.weight", (16, 64), mesh, rules) == (None, "tensor")
    assert partition_spec("model.norm.weight", (16,), mesh, rules) == (None,)
    assert partition_spec("model.layers.0.self_attn.o_proj.bias", (16,), mesh, rules) == (None,)
    fsdp = {"fsdp": 2, "tensor": 2}
    assert partition_spec("lm_head.weight", (64, 16), fsdp, rules) == ("tensor", "fsdp")
    # A user's rule first overrides the default.
    mine = ((r"lm_head\.weight$", (None, "tensor")), *rules)
    assert partition_spec("lm_head.weight", (64, 16), mesh, mine) == (None, "tensor")


def test_partition_spec_errors_name_the_tensor():
    rules = ((r"q_proj\.weight$", ("tensor", None)),)
    with pytest.raises(ValueError, match=r"q_proj\.weight: dimension 0 \(size 30\).*'tensor' of size 4"):
        partition_spec("layers.0.q_proj.weight", (30, 16), {"tensor": 4}, rules)
    with pytest.raises(ValueError, match="unknown"):
        partition_spec("q_proj.weight", (32, 16), {"tensor": 4}, ((r"q_proj", ("model",)),))
    with pytest.raises(ValueError, match="2 axes"):
        partition_spec("q_proj.bias", (32,), {"tensor": 4}, ((r"q_proj", ("tensor", None)),))


def test_parse_mesh():
    assert parse_mesh("data=2,tensor=4") == {"data": 2, "tensor": 4}
    for bad in ("data=2,data=2", "model=2", "tensor=0", "tensor", ""):
        with pytest.raises(ValueError, match="--mesh"):
            parse_mesh(bad)


def test_torch_sharded_equals_unsharded_on_two_ranks(tmp_path):
    """World size 2 on gloo: tensor parallel (`tensor=2`) and FSDP2 (`fsdp=2`, each rank half
    the batch), each loaded sharded (cut on the meta device, each rank reading its slices); every
    parameter placed as the table says, forward logits, loss and every gradient equal to the
    single-process run to 1e-12, each rank holding about half the parameter bytes, and the
    parameters after 3 train_step updates with dropout equal the single process's (each FSDP rank
    draws the masks of its rows in the whole batch). Under tensor parallelism also greedy
    `generate()` (same tokens) and a tied LM head (logits, gradients); under FSDP2 data-parallel
    greedy `generate()`: each rank's rows give the single process's tokens on those rows, rank 0
    stopping (eos) after one token while rank 1 runs on, then training from that model."""
    rows = _run("tests.helpers.sharded_torch", str(tmp_path / "ckpt"), "2")
    assert sorted((r["rank"], tuple(r["mesh"].items())) for r in rows) == [
        (0, (("fsdp", 2),)), (0, (("tensor", 2),)), (1, (("fsdp", 2),)), (1, (("tensor", 2),))]
    for r in rows:
        assert r["ok"] and r["wrong_sharding"] == [], r
        assert max(r["logits_err"], r["loss_err"], r["grad_err"]) <= 1e-12, r
        assert r["train_param_err"] <= 1e-12, r  # after 3 train_step updates
        # FSDP2 splits every parameter; tensor parallelism leaves the norms whole (0.35% here).
        assert r["resident_fraction"] <= (0.5 if "fsdp" in r["mesh"] else 0.51), r
        if "tensor" in r["mesh"]:
            assert r["tokens_equal"] and max(r["tied_logits_err"], r["tied_grad_err"]) <= 1e-12, r
        else:  # rank 0's rows stop at their first token (eos); rank 1's do not
            assert r["dp_tokens_equal"] and (r["dp_new_tokens"] == 1) == (r["rank"] == 0), r


def test_torch_two_dimensional_meshes_on_four_ranks_and_sharded_saves(tmp_path):
    """World size 4 on gloo: FSDP2 x tensor parallel (`fsdp=2, tensor=2`; FSDP2 shards each
    rank's tensor-parallel shard, a strided placement read as one slice) and HSDP (`data=2,
    fsdp=2`), each loaded sharded: logits, loss and every gradient equal to the single process to
    1e-12, each rank holding about 1/4 (FSDP x TP) or 1/2 (HSDP: replicated over data) of the
    parameter bytes; greedy `generate()` of each rank's rows gives the single process's tokens
    for them. The sharded model saved gathered (rank 0 writes a normal checkpoint) and
    per process (pieces + index, consolidated) loads unsharded to the very same parameters."""
    rows = _run("tests.helpers.sharded_torch", str(tmp_path / "ckpt"), "4")
    *rows, saved = rows
    assert sorted((r["rank"], tuple(r["mesh"])) for r in rows) == sorted(
        (rank, mesh) for rank in range(4) for mesh in (("fsdp", "tensor"), ("data", "fsdp")))
    for r in rows:
        assert r["ok"] and max(r["logits_err"], r["loss_err"], r["grad_err"]) <= 1e-12, r
        assert r["dp_tokens_equal"], r  # data-parallel generate() of the rank's rows
        # The norms stay whole across tensor ranks (FSDP2 splits them over fsdp): 0.7% over 1/4 here.
        assert r["resident_fraction"] <= (0.26 if "tensor" in r["mesh"] else 0.5), r
    assert saved["saved"] == {"gathered_fsdp_tensor": True, "hf_pieces_data_fsdp": True, "hf_pieces_fsdp_tensor": True,
                              "pieces_data_fsdp.files": 5, "pieces_fsdp_tensor.files": 5}, saved


def test_flax_two_processes_each_read_their_slices(tmp_path):
    """`jax.distributed` on 127.0.0.1: two processes of 4 CPU devices, one (fsdp=2, tensor=4) mesh
    with fsdp across the processes. Each process reads about half the checkpoint's bytes (its
    devices' slices; norms whole), and the sharded logits equal the one-device run. Then the sharded
    model saved gathered and per process gives back the checkpoint's tensors."""
    import socket

    import torch

    import torch_impl
    from weights.config import ModelConfig

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    torch_impl.ForCausalLM(config, dtype=torch.float64).save_pretrained(tmp_path / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.sharded_flax_processes", str(i), str(port),
                               str(tmp_path / "ckpt")], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out + err[-3000:]
    rows = [json.loads(next(line for line in out.splitlines() if line.startswith("{"))) for out, _ in outputs]
    for r in rows:
        assert r["devices"] == 8 and r["local"] == 4 and r["processes"] == 2, r
        assert 0.5 <= r["read_fraction"] <= 0.52, r  # half of every split tensor, the norms whole
        assert r["logits_err"] <= 1e-12, r
    # The model sharded over both processes, saved gathered (process 0 writes) and per process
    # (each its devices' pieces; consolidated here): the very tensors of the checkpoint it came from.
    from weights.checkpoint import CheckpointReader
    from weights.pieces import PIECES_INDEX, consolidate

    assert sorted(p.name for p in (tmp_path / "flax_pieces").iterdir()) == [
        "config.json", "model-rank00000-of-00002.safetensors", "model-rank00001-of-00002.safetensors", PIECES_INDEX]
    with CheckpointReader(tmp_path / "ckpt") as want:
        for saved in (tmp_path / "flax_gathered", consolidate(tmp_path / "flax_pieces", tmp_path / "flax_whole")):
            with CheckpointReader(saved) as got:
                assert sorted(got.keys()) == sorted(want.keys()), saved
                for k in want.keys():
                    assert np.array_equal(got.get(k), want.get(k)), (saved, k)


def test_the_memory_check_counts_one_process_share(tmp_path, monkeypatch):
    """A model sharded over N processes needs 1/N of it per process: `open_pretrained` refuses
    by that share, not by the whole model."""
    import torch

    import torch_impl
    import weights.shapes
    from weights.config import ModelConfig
    from weights.errors import MemoryLimitError
    from weights.pretrained import open_pretrained

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch_impl.ForCausalLM(config, dtype=torch.float32).save_pretrained(tmp_path)
    whole = sum(p.numel() * 4 for p in torch_impl.ForCausalLM(config).parameters())
    monkeypatch.setattr(weights.shapes, "memory_limit", lambda: whole // 2 + 1)
    with pytest.raises(MemoryLimitError, match="ForCausalLM"):
        open_pretrained(tmp_path, "ForCausalLM")
    open_pretrained(tmp_path, "ForCausalLM", processes=2)
