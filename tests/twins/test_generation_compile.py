"""`generate(..., compile=...)`: the compiled decode step is the eager step, run through
`torch.compile` on the same static cache. It gives the eager loop's tokens and scores, and it
compiles once: the loop's shapes never change, and a second call of the same shape reuses both
the graph and the cache buffers (what lets CUDA graphs replay).

The test compiles with dynamo and AOT autograd but runs the captured graph eagerly
(`backend="aot_eager"`): Inductor's C++ kernels take 40-80 s to build from a cold cache on the
2-core CI machine. With TWINLM_TEST_INDUCTOR=1 the same test runs Inductor itself; the
`side_by_side` bench holds Inductor's (and, on a GPU, the CUDA graphs') tokens to the eager ones
on every run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import torch_impl.generation as tg
from tests.helpers.twins import assert_close, randomized_pair
from weights.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# One layer: dynamo's trace time grows with the layers, and one is the whole step's code.
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)
IDS = np.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
MASK = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # a left-padded row: per-row positions


def backends():
    inductor = pytest.param("inductor", marks=pytest.mark.skipif(
        os.environ.get("TWINLM_TEST_INDUCTOR") != "1", reason="set TWINLM_TEST_INDUCTOR=1 (cold build 40-80 s)"))
    return ["aot_eager", inductor]


@pytest.mark.parametrize("backend", backends())
def test_compiled_decoding_equals_eager_and_compiles_once(monkeypatch, backend):
    model = randomized_pair(CONFIG, dtype="float32")[0]
    # What compile=True picks on the CPU: "frozen" (Inductor's freezing; aot_eager has none).
    freezing = dict(options={"freezing": True}) if backend == "inductor" else {}
    step = torch.compile(tg._decode_step, backend=backend, fullgraph=True, dynamic=False, **freezing)
    monkeypatch.setitem(tg._COMPILED, "frozen", step)
    ids, mask = torch.from_numpy(IDS), torch.from_numpy(MASK)
    kw = dict(max_new_tokens=6, return_scores=True)
    counters.clear()
    eager = tg.generate(model, ids, mask, **kw)
    compiled = tg.generate(model, ids, mask, compile=True, **kw)
    np.testing.assert_array_equal(compiled.sequences.numpy(), eager.sequences.numpy())
    for field in ("token_logprobs", "top_probs"):
        assert_close(field, getattr(eager, field).numpy(), getattr(compiled, field).numpy(), "float32")
    np.testing.assert_array_equal(compiled.top_tokens.numpy(), eager.top_tokens.numpy())
    assert counters["stats"]["unique_graphs"] == 1  # five decode steps, one graph

    # Same shapes again (other prompts, sampled): the graph and the zeroed cache buffers are reused.
    buffers = [t.data_ptr() for t in tg._STATIC_CACHES[model].keys]
    other = torch.from_numpy((IDS + 9) % CONFIG.vocab_size)
    sample = dict(max_new_tokens=6, do_sample=True, top_k=5, seed=3)
    np.testing.assert_array_equal(tg.generate(model, other, mask, compile=True, **sample).numpy(),
                                  tg.generate(model, other, mask, **sample).numpy())
    assert [t.data_ptr() for t in tg._STATIC_CACHES[model].keys] == buffers
    assert counters["stats"]["unique_graphs"] == 1

    # A frozen graph holds the weights it was built with: once they change, the compiled steps go.
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    with torch.inference_mode():  # as generate() calls it
        tg._static_cache(model, tg._STATIC_CACHES[model])
    assert "frozen" not in tg._COMPILED


def test_compile_argument_errors():
    model = randomized_pair(CONFIG, dtype="float32")[0]
    ids = torch.from_numpy(IDS[1:])
    with pytest.raises(ValueError, match="compile: expected True, False or one of reduce-overhead"):
        tg.generate(model, ids, max_new_tokens=2, compile="fast")
    with pytest.raises(ValueError, match="beam search"):
        tg.generate(model, ids, max_new_tokens=2, num_beams=2, compile=True)
