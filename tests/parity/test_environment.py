"""Devices, the matmul precision and mixed precision in the parity commands, on the CPU: the
flags reach both twins, the switches are set for the run and restored after, every report
records devices, precision settings and versions, and a device this machine lacks is a clear
error (exit status 2), not a crash."""

from __future__ import annotations

import json

import numpy as np

import pytest

from parity.cli import main
from torch_impl.layers.precision import matmul_settings as torch_settings
from flax_impl.layers.precision import matmul_settings as flax_settings


def test_torch_loads_off_the_cpu_block_by_block_bit_for_bit(checkpoint, monkeypatch):
    """The accelerator branch of torch's loader (row blocks through one small host buffer), run
    on the CPU with 256-byte blocks so every tensor takes several: the same bits as in place."""
    import torch

    import torch_impl
    import weights.blockcopy
    from torch_impl import checkpoint as ck

    direct = torch_impl.ForCausalLM.from_pretrained(checkpoint, dtype="float32", param_dtype="bfloat16")
    monkeypatch.setattr(ck, "_in_host_memory", lambda t: False)
    monkeypatch.setattr(weights.blockcopy, "BLOCK_BYTES", 256)
    staged = torch_impl.ForCausalLM.from_pretrained(checkpoint, dtype="float32", param_dtype="bfloat16",
                                                    device="cpu")
    assert staged.model.dtype == torch.float32 and {p.dtype for p in staged.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(direct.state_dict().items(), staged.state_dict().values()):
        assert torch.equal(a, b), name


def test_flax_loads_off_the_cpu_block_by_block_bit_for_bit(checkpoint, tmp_path, monkeypatch):
    """The accelerator branch of Flax's loader (row blocks placed one by one, joined and kernels
    transposed on the device), run on the CPU with 256-byte blocks: the same bits as the host
    path, from an HF-layout and a Flax-layout checkpoint, with a cast."""
    from flax import nnx

    import flax_impl
    import weights.blockcopy
    from flax_impl import checkpoint as ck
    from weights.convert import convert

    def params(model):
        return [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]

    flax_layout = tmp_path / "flax-layout"
    convert(checkpoint, flax_layout, layout="flax", progress=False)
    direct = params(flax_impl.ForCausalLM.from_pretrained(checkpoint, dtype="float32", param_dtype="bfloat16"))
    monkeypatch.setattr(ck, "_is_host_device", lambda device: False)
    monkeypatch.setattr(weights.blockcopy, "BLOCK_BYTES", 256)
    for source in (checkpoint, flax_layout):
        staged = params(flax_impl.ForCausalLM.from_pretrained(source, dtype="float32", param_dtype="bfloat16"))
        assert len(staged) == len(direct)
        for a, b in zip(direct, staged):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint16), b.view(np.uint16))


def test_flax_loads_onto_the_chosen_device(checkpoint):
    import jax
    from flax import nnx

    import flax_impl

    cpu = jax.devices("cpu")[0]
    model = flax_impl.ForCausalLM.from_pretrained(checkpoint, dtype="bfloat16", param_dtype="float32", device=cpu,
                                                  precision="tf32")
    params = [v[...] for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert {next(iter(p.devices())) for p in params} == {cpu} and {p.dtype.name for p in params} == {"float32"}
    assert model.model.dtype == "bfloat16" and model.precision == jax.lax.Precision.HIGHEST  # no mode for bf16


def test_check_records_devices_precision_and_versions(checkpoint, tmp_path, capsys):
    before = (torch_settings(), flax_settings())
    out = tmp_path / "r.json"
    code = main(["check", str(checkpoint), "--dtype", "bfloat16", "--param-dtype", "float32", "--matmul-precision",
                 "tf32", "--device", "cpu", "--jax-platform", "cpu", "--skip", "gradients", "--skip", "kv-cache",
                 "--skip", "generation", "--json", str(out)])
    assert code == 0, capsys.readouterr().out
    assert (torch_settings(), flax_settings()) == before  # restored after the run
    report = json.loads(out.read_text())
    env = report["meta"]["environment"]
    assert report["dtype"] == "bfloat16/float32"  # the mixed-precision row of the table
    assert env["devices"] == {"torch": "cpu", "flax": "cpu:0 (cpu)"}
    assert env["matmul_precision"]["mode"] == "tf32"
    assert env["matmul_precision"]["flax"] == {"jax_default_matmul_precision": "tensorfloat32"}
    assert "HIGHEST" in env["matmul_precision"]["flax_dots"]  # bfloat16 dots have no mode
    assert set(env["versions"]) >= {"torch", "jax", "flax", "numpy"}
    assert "run on: torch cpu, flax cpu:0 (cpu); matmuls tf32" in capsys.readouterr().out


@pytest.mark.parametrize("args, row", [(("float32",), "float32"), (("float32", None, "tf32"), "float32@tf32"),
                                       (("bfloat16", "float32", "tf32"), "bfloat16/float32"),
                                       (("bfloat16", "bfloat16", "bf16x3"), "bfloat16")])
def test_the_row_of_a_run(args, row):
    from parity.tolerances import TOLERANCES, row_name

    assert row_name(*args) == row and row in TOLERANCES


def test_record_and_compare_carry_the_run_settings(checkpoint, tmp_path):
    from weights import SafetensorsFile

    ref = tmp_path / "ref.safetensors"
    assert main(["record", str(checkpoint), str(ref), "--framework", "flax", "--dtype", "bfloat16",
                 "--param-dtype", "float32", "--matmul-precision", "bf16x3"]) == 0
    with SafetensorsFile(ref) as f:
        meta = f.metadata
    assert (meta["param_dtype"], meta["matmul_precision"], meta["device"]) == ("float32", "bf16x3", "cpu:0 (cpu)")
    assert json.loads(meta["environment"])["matmul_precision"]["flax"]["jax_default_matmul_precision"] == \
        "BF16_BF16_F32_X3"
    out = tmp_path / "c.json"
    assert main(["compare", str(checkpoint), str(ref), "--framework", "torch", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16/float32"  # recorded dtypes, reused
    assert report["meta"]["environment"]["matmul_precision"]["mode"] == "bf16x3"


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "torch sees no CUDA device"),
    (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
    (["--jax-platform", "tpu"], "no tpu backend"),
])
def test_a_missing_device_is_a_clear_error(checkpoint, capsys, flags, message):
    import torch

    if flags[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert main(["check", str(checkpoint), *flags]) == 2
    assert message in capsys.readouterr().err


def test_gpu_check_falls_back_to_the_cpu_and_says_so(checkpoint, tmp_path, capsys, monkeypatch):
    """The script's CPU path (this machine has no GPU): the banner, one table row per check and
    float32 matmul mode."""
    from parity.check import gpu

    monkeypatch.setattr(gpu, "gpu_available", lambda: (False, "test: no GPU"))
    monkeypatch.setattr("parity.demo.DEMO_MODELS", [m for m in __import__("parity.demo").demo.DEMO_MODELS
                                                    if m.name == "llama-tied-causal-lm"])
    assert gpu.main(["--out", str(tmp_path), "--dtypes", "float32", "--matmul-precisions", "highest,bf16x3",
                     "--no-pytest", "--skip", "gradients", "--skip", "kv-cache", "--skip", "generation"]) == 0
    out = capsys.readouterr().out
    assert "NO GPU (test: no GPU)" in out and "the GPU rows are unmeasured" in out
    # One line per float32 matmul mode, each named by the tolerance row it was held to.
    assert "llama-tied-causal-lm  causal_lm  float32         torch cpu, flax cpu:0 (cpu)" in out
    assert "llama-tied-causal-lm  causal_lm  float32@bf16x3  torch cpu, flax cpu:0 (cpu)" in out
    with pytest.raises(SystemExit) as bad:
        gpu.main(["--matmul-precisions", "highest,fp8"])
    assert bad.value.code == 2
    assert out.rstrip().splitlines()[-1].startswith("NO GPU (test: no GPU): the figures above are the CPU's")
    assert gpu.main(["--require-gpu", "--no-pytest"]) == 3


def test_the_streamed_check_refuses_settings_it_cannot_honour(checkpoint, capsys):
    """The layer-streamed check runs on the CPU in --dtype with 'highest' matmuls: asked for
    another setting, it says which flags need the whole-model check, before loading anything."""
    assert main(["check", str(checkpoint), "--stream", "--dtype", "bfloat16", "--param-dtype", "float32",
                 "--matmul-precision", "highest"]) == 2
    err = capsys.readouterr().err
    assert "--param-dtype need the whole-model check (--no-stream" in err
