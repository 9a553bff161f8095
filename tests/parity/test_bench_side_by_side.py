"""The side-by-side bench compares like with like: HF transformers' LLaMA built by the bench runs
the twin's own weights (same logits, same greedy tokens), and the interleaving pairs each round's
times. No timing is asserted (figures live in `make bench`)."""

import sys

import numpy as np
import pytest
import torch

from parity.bench import side_by_side
from tests.helpers.configs import TINY
from tests.helpers.twins import assert_close, randomized_pair
from torch_impl.layers.linear import Linear


def test_hf_torch_runs_the_twins_weights_with_the_same_results():
    t_model, f_model = randomized_pair(TINY, dtype="float32")
    hf = side_by_side._hf_torch(TINY, dict(t_model.state_dict()), "cpu", torch.float32)
    twin = side_by_side._torch_twin(t_model, "cpu")
    flax = side_by_side._flax_twin(f_model)
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 7))
    reference = twin.forward(ids)().numpy()
    assert_close("HF torch logits", reference, hf.forward(ids)().numpy(), "float32")
    assert_close("Flax twin logits", reference, np.asarray(flax.forward(ids)()), "float32")
    fast = side_by_side._torch_twin(t_model, "cpu", "fast"), side_by_side._flax_twin(f_model, "fast")
    assert [s.name for s in fast] == ["torch twin (fast)", "Flax twin (fast)"]
    for system in fast:
        assert_close(f"{system.name} logits", reference, np.asarray(system.forward(ids)()), "float32")
    tokens = twin.decode(ids, 4)().numpy()
    np.testing.assert_array_equal(hf.decode(ids, 4)().numpy(), tokens)
    np.testing.assert_array_equal(flax.decode(ids, 4)(), tokens)
    # transformers 5 has no Flax models: the row says how to measure them. (With 4.57 beside it,
    # HF Flax gives these logits and tokens too, in float32 JAX: its generate is not x64-clean.)
    hf_flax, note = side_by_side._hf_flax(TINY, dict(t_model.state_dict()))
    assert hf_flax is not None or "transformers==4.57" in note


def test_interleaved_runs_every_system_once_per_round_and_pairs_rounds():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = side_by_side.interleaved(calls, {"a": lambda: None, "b": lambda: None}, repeat=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert [len(v) for v in times.values()] == [3, 3]
    assert side_by_side.ratio({"t": [2.0, 9.0, 3.0], "r": [1.0, 3.0, 3.0]}, "t", "r") == 2.0


def test_systems_and_workloads_are_chosen_by_the_environment(monkeypatch):
    monkeypatch.setenv("TWINLM_BENCH_SYSTEMS", "hf, torch-compiled")
    assert side_by_side.selected_systems() == {"hf", "torch-compiled"}
    monkeypatch.setenv("TWINLM_BENCH_SYSTEMS", "hf,jax")
    with pytest.raises(ValueError, match="TWINLM_BENCH_SYSTEMS: unknown jax; known: hf, hf-static"):
        side_by_side.selected_systems()
    monkeypatch.setenv("TWINLM_BENCH_WORKLOADS", "decode,busy")
    assert side_by_side.wanted("greedy decode b8, 64 new (1 core kept busy)")
    assert not side_by_side.wanted("greedy decode b8, 64 new (as is)")
    assert not side_by_side.wanted("forward 1x128 (1 core kept busy)")
    monkeypatch.delenv("TWINLM_BENCH_WORKLOADS")
    assert side_by_side.wanted("forward 1x128 (as is)")


def test_compiled_twin_is_a_decode_only_system_and_hf_is_skipped_without_transformers(monkeypatch):
    model = randomized_pair(TINY, dtype="float32")[0]
    compiled = side_by_side._torch_twin(model, "cpu", compile=True)
    assert (compiled.name, compiled.key, compiled.forward) == ("torch twin (compiled)", "torch-compiled", None)
    # The packed system packs the rows each workload multiplies when its call is made (untimed).
    packed = side_by_side._torch_twin(model, "cpu", packed=True)
    assert (packed.name, packed.key) == ("torch twin (packed)", "torch-packed")
    packed.decode(np.zeros((2, 5), np.int64), 2)  # decode steps of 2 rows, a prompt pass of 10
    assert {tuple(m.packed) for m in model.modules() if isinstance(m, Linear)} == {(2, 10)}
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    systems, note = side_by_side._hf_systems(TINY, dict(model.state_dict()), "cpu", torch.float32, {"hf", "torch"})
    assert systems == [] and note.startswith("HF torch not measured: transformers does not import")
    assert side_by_side._hf_flax(TINY, {})[1].startswith("HF Flax not measured: transformers does not import")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_section_says_why_it_measured_nothing_without_a_gpu():
    rows = side_by_side._gpu_rows()
    assert len(rows) == 1 and rows[0].ok is False and "sees no CUDA device" in rows[0].value
