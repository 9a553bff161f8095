"""The side-by-side bench compares like with like: HF transformers' LLaMA built by the bench runs
the twin's own weights (same logits, same greedy tokens), and the interleaving pairs each round's
times. No timing is asserted (figures live in `make bench`)."""

import numpy as np
import torch

from parity.bench import side_by_side
from tests.helpers.configs import TINY
from tests.helpers.twins import assert_close, randomized_pair


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


def test_interleaved_runs_every_system_once_per_round_and_pairs_rounds():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = side_by_side.interleaved(calls, {"a": lambda: None, "b": lambda: None}, repeat=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert [len(v) for v in times.values()] == [3, 3]
    assert side_by_side.ratio({"t": [2.0, 9.0, 3.0], "r": [1.0, 3.0, 3.0]}, "t", "r") == 2.0
