"""`prepack_linears` (torch twin, CPU float32): MKL-packed weights give the plain product's logits
within the tolerance table, and are taken only where they apply: at a packed row count, outside
autograd, on a weight unchanged since it was packed. Every other call is the plain `F.linear`,
bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_impl
import torch_impl.layers.linear as t_linear
from tests.helpers.configs import TINY
from tests.helpers.twins import assert_close, batch, randomize
from torch_impl.generation import generate
from torch_impl.layers.linear import prepack_linears

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL packs the weights; no MKL here")]

DATA = batch(TINY, b=2, t=9)
IDS, MASK = torch.from_numpy(DATA["input_ids"]), torch.from_numpy(DATA["attention_mask"])
ROWS = IDS.numel()  # the tokens one forward of the batch multiplies


def tiny_model(dtype: torch.dtype = torch.float32) -> torch_impl.ForCausalLM:
    model = torch_impl.ForCausalLM(TINY, dtype=dtype).eval()
    randomize(model, seed=0)
    return model


@pytest.fixture
def taken(monkeypatch) -> list[bool]:
    """Whether each Linear call took a packed weight, in call order."""
    calls = []
    real = t_linear.Linear.packed_for

    def spy(self, x):
        packed = real(self, x)
        calls.append(packed is not None)
        return packed

    monkeypatch.setattr(t_linear.Linear, "packed_for", spy)
    return calls


def test_packed_weights_give_the_plain_logits_at_their_row_count_only(taken):
    model = tiny_model()
    with torch.inference_mode():
        plain, plain_other = model(IDS, MASK).logits, model(IDS[:1]).logits
        assert not taken  # nothing packed: the spy is not even asked
        prepack_linears(model, (ROWS,))
        packed = model(IDS, MASK).logits
        # q, k, v, o and the MLP's three per layer, and the LM head: every one packed.
        assert taken == [True] * (7 * TINY.num_hidden_layers + 1)
        taken.clear()
        other = model(IDS[:1]).logits  # 9 rows: no pack for it
        assert taken and not any(taken)
        assert torch.equal(other, plain_other)
        # MKL reads the pack, not the weight: zeroed behind the version counter (`.data`), the
        # layers' weights leave the packed product as it was.
        for layer in model.model.layers.modules():
            if isinstance(layer, t_linear.Linear):
                layer.weight.data.zero_()
        assert torch.equal(model(IDS, MASK).logits, packed)
    assert_close("packed logits", plain.double().numpy(), packed.double().numpy(), "float32", "logits")


def test_greedy_decoding_on_packed_weights(taken):
    model = tiny_model()
    plain = generate(model, IDS, MASK, max_new_tokens=6, return_scores=True)
    prepack_linears(model, (IDS.shape[0],))  # a decode step multiplies one row per sequence
    packed = generate(model, IDS, MASK, max_new_tokens=6, return_scores=True)
    # Every linear of the 5 decode steps, and the LM head of all 6 token choices (the prompt
    # pass's head reads only the last position: one row per sequence too); the rest is plain.
    assert taken.count(True) == 5 * 7 * TINY.num_hidden_layers + 6
    np.testing.assert_array_equal(packed.sequences.numpy(), plain.sequences.numpy())
    for field in ("token_logprobs", "top_probs"):
        assert_close(field, getattr(plain, field).numpy(), getattr(packed, field).numpy(), "float32")


def test_a_changed_weight_and_autograd_take_the_plain_product(taken):
    model = tiny_model()
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(ROWS, TINY.hidden_size)
    prepack_linears(model, (ROWS,))
    # Training: the packed product has no backward. Same gradients as with no packs at all.
    model(IDS, MASK).logits.square().sum().backward()
    assert taken and not any(taken)
    grads = [p.grad.clone() for p in model.parameters()]
    prepack_linears(model, ())
    model.zero_grad()
    model(IDS, MASK).logits.square().sum().backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    # A weight written in place (an optimizer step, a load) after packing: its pack is stale.
    prepack_linears(model, (ROWS,))
    with torch.no_grad():
        layer.weight.mul_(1.5)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))
    assert ROWS not in layer.packed
    assert ROWS in model.model.layers[0].mlp.down_proj.packed  # the unchanged ones keep theirs


def test_prepack_refuses_what_it_cannot_pack_and_drops_packs():
    model = tiny_model()
    for bad in ((0,), (2.0,), (True,)):
        with pytest.raises(ValueError, match="rows"):
            prepack_linears(model, bad)
    with pytest.raises(ValueError, match="float32 on the CPU.*torch.float64"):
        prepack_linears(tiny_model(torch.float64), (ROWS,))
    prepack_linears(model, (ROWS, 2))
    assert {len(m.packed) for m in model.modules() if isinstance(m, t_linear.Linear)} == {2}
    prepack_linears(model, ())
    assert {len(m.packed) for m in model.modules() if isinstance(m, t_linear.Linear)} == {0}
