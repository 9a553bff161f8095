"""`prepack_linears` (CPU float32), in each twin: packed weights (torch: packed by MKL per row
count; Flax: one `[out, in]` copy of the kernel for the row counts named) give the plain
product's logits within the tolerance table, and are taken only where they apply: at a packed
row count, on a weight unchanged since it was packed, outside autograd (torch) and, traced,
only inside `generate()` and the serving `Runner` (Flax). Every other call is the plain product,
bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_impl.generation as f_generation
import flax_impl.layers.linear as f_linear
import torch_impl
import torch_impl.layers.linear as t_linear
from parity.loading import copy_weights, twins_from_config
from tests.helpers.configs import TINY
from tests.helpers.twins import assert_close, batch, randomize, spy_on_packs
from torch_impl.generation import generate
from flax_impl.layers.linear import prepack_linears as prepack_linears_flax
from torch_impl.layers.linear import prepack_linears

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL packs the weights; no MKL here")

DATA = batch(TINY, b=2, t=9)
IDS, MASK = torch.from_numpy(DATA["input_ids"]), torch.from_numpy(DATA["attention_mask"])
ROWS = IDS.numel()  # the tokens one forward of the batch multiplies


def tiny_model(dtype: torch.dtype = torch.float32) -> torch_impl.ForCausalLM:
    model = torch_impl.ForCausalLM(TINY, dtype=dtype).eval()
    randomize(model, seed=0)
    return model


@pytest.fixture
def taken(monkeypatch) -> list[bool]:
    return spy_on_packs(monkeypatch, t_linear)


@needs_mkl
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


@needs_mkl
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


@needs_mkl
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


@needs_mkl
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


# ---- the Flax twin: an [out, in] copy for one-row products -------------------------------------

LINEARS = 7 * TINY.num_hidden_layers + 1  # q, k, v, o, gate, up, down per layer, and the LM head


def flax_model(dtype: str = "float32") -> nnx.Module:
    """The Flax twin of `tiny_model`'s random weights."""
    t_model, f_model = twins_from_config(TINY, dtype=dtype).pair
    randomize(t_model, seed=0)
    copy_weights(t_model, f_model)
    return f_model


@pytest.fixture
def flax_taken(monkeypatch) -> list[bool]:
    return spy_on_packs(monkeypatch, f_linear)


def test_flax_one_row_reads_the_transposed_copy_and_other_rows_the_kernel(flax_taken):
    model = flax_model()
    one, two = jnp.asarray(IDS[1:, -1:].numpy()), jnp.asarray(IDS[:, -1:].numpy())
    plain, plain_two = model(one).logits, model(two).logits
    prepack_linears_flax(model, (1, 3))
    copies = {id(p.weight) for _, m in nnx.iter_graph(model) if isinstance(m, f_linear.Linear)
              for p in m.packed.values()}
    assert len(copies) == LINEARS  # one copy per layer, shared by its row counts
    flax_taken.clear()
    packed = model(one).logits
    assert flax_taken == [True] * LINEARS
    flax_taken.clear()
    assert jnp.array_equal(model(two).logits, plain_two) and not any(flax_taken)
    assert_close("packed logits", np.asarray(plain, np.float64), np.asarray(packed, np.float64), "float32", "logits")
    # The product reads the copy: given another matrix, a layer multiplies by that one.
    layer = model.model.layers[0].mlp.down_proj
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, TINY.intermediate_size)), jnp.float32)
    other = 2.0 * layer.packed[1].weight
    f_linear._PACKS[layer][1] = layer.packed[1]._replace(weight=other)
    expected = jax.lax.dot_general(x, other, (((1,), (1,)), ((), ())))
    assert jnp.array_equal(layer(x), expected if layer.bias is None else expected + layer.bias[...])
    # A jitted call of the user's own, and a gradient, cannot check the copy against the kernel:
    # they take the kernel.
    flax_taken.clear()
    jitted = nnx.jit(lambda m, i: m(i).logits)
    packed_jitted = jitted(model, one)
    prepack_linears_flax(model, ())
    assert jnp.array_equal(packed_jitted, jitted(model, one)) and not any(flax_taken)


def test_flax_generate_decodes_on_the_copies(flax_taken):
    model = flax_model()
    ids, mask = jnp.asarray(IDS[1:].numpy()), jnp.asarray(MASK[1:].numpy())
    plain = f_generation.generate(model, ids, mask, max_new_tokens=6, return_scores=True)
    prepack_linears_flax(model, (1,))
    flax_taken.clear()
    packed = f_generation.generate(model, ids, mask, max_new_tokens=6, return_scores=True)
    # Traced once: the loop body's linears, and the LM head of the prompt pass (its last
    # position only); the prompt pass's other linears multiply 9 rows.
    assert flax_taken.count(True) == LINEARS + 1
    np.testing.assert_array_equal(np.asarray(packed.sequences), np.asarray(plain.sequences))
    for field in ("token_logprobs", "top_probs"):
        assert_close(field, np.asarray(getattr(plain, field), np.float64),
                     np.asarray(getattr(packed, field), np.float64), "float32")
    # The compiled program reads the copies it was handed: zero copies give a uniform distribution.
    for layer in f_linear._PACKS:
        f_linear._PACKS[layer][1] = layer.packed[1]._replace(weight=jnp.zeros_like(layer.packed[1].weight))
    zeroed = f_generation.generate(model, ids, mask, max_new_tokens=6, return_scores=True)
    np.testing.assert_allclose(np.asarray(zeroed.token_logprobs), -np.log(TINY.vocab_size), rtol=1e-6)


def test_flax_a_changed_kernel_and_gradients_take_the_kernel(flax_taken):
    model, one = flax_model(), jnp.asarray(IDS[1:, -1:].numpy())
    prepack_linears_flax(model, (1,))

    def loss(m):
        return jnp.square(m(IDS[1:, -1:].numpy()).logits).sum()  # numpy: the id check reads it under jit

    flax_taken.clear()
    grad = nnx.jit(nnx.grad(loss))
    grads = grad(model)  # traced on a copy of the module: nothing asks for a pack
    assert not any(flax_taken)
    prepack_linears_flax(model, ())
    plain = grad(model)
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain)))
    # A kernel given a new value (an optimizer step, a load) after packing: its copy is stale,
    # and neither an eager call nor generate() reads it.
    prepack_linears_flax(model, (1,))
    layer = model.model.layers[0].mlp.up_proj
    layer.kernel[...] = layer.kernel[...] * 1.5
    fresh = f_linear.linear_packs(model)
    assert not any(k.endswith("layers/0/mlp/up_proj") for k in fresh)
    assert any(k.endswith("layers/0/mlp/down_proj") for k in fresh)  # the unchanged ones keep theirs
    assert 1 not in layer.packed
    x = jnp.ones((1, TINY.hidden_size), jnp.float32)
    assert jnp.array_equal(layer(x), x @ layer.kernel[...])


def test_flax_prepack_refuses_what_it_cannot_pack_and_drops_packs():
    model = flax_model()
    for bad in ((0,), (2.0,), (True,)):
        with pytest.raises(ValueError, match="rows"):
            prepack_linears_flax(model, bad)
    with pytest.raises(ValueError, match="float32 on one CPU device.*float64 on cpu"):
        prepack_linears_flax(flax_model("float64"), (1,))
    prepack_linears_flax(model, (1,))
    assert {len(m.packed) for _, m in nnx.iter_graph(model) if isinstance(m, f_linear.Linear)} == {1}
    prepack_linears_flax(model, ())
    assert {len(m.packed) for _, m in nnx.iter_graph(model) if isinstance(m, f_linear.Linear)} == {0}
    assert f_linear.linear_packs(model) == {}
