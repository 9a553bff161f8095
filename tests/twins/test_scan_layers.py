"""The Flax twin's scanned layer stack (`DecoderModel.scan_layers`: one `lax.scan` over a stacked
copy of the layers' parameters, so XLA compiles one layer) against the unrolled loop, the
reference: logits, hidden states and attention weights within the tolerance table in float64
and float32, for families whose layers differ by window (alternating sliding / global) and for
experts; cached decoding with per-row lengths; identical greedy tokens; a clear refusal for
layers of different kinds. The loop stays the default."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_impl
from flax import nnx

from flax_impl import generation
from flax_impl.generation import generate
from flax_impl.layers.attention import set_attn_implementation
from flax_impl.model import same_structure
from parity import strategies as tst
from tests.helpers.configs import TINY
from tests.helpers.twins import assert_close, batch, fcall, randomized_pair

FAMILIES = tst.family_examples()
CONFIGS = {
    "llama": TINY,
    "gemma2": FAMILIES["gemma2"],  # a sliding layer then a global one, soft caps, sandwich norms
    "qwen2": FAMILIES["qwen2"],  # a global layer then a sliding one
    "mixtral": FAMILIES["mixtral"].replace(output_router_logits=True),  # experts, sliding windows
}


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("name, dtype", [("gemma2", "float64"), ("mixtral", "float32")])
def test_scan_gives_the_loops_outputs(name, dtype):
    config = CONFIGS[name]
    model = randomized_pair(config, dtype=dtype)[1]
    assert model.model.scan_layers is False  # the loop is the default
    x = batch(config, b=2, t=9)  # row 0 left-padded
    ids, mask = jnp.asarray(x["input_ids"]), jnp.asarray(x["attention_mask"])
    kw = dict(output_hidden_states=True, output_attentions=True)
    loop = fcall(model, ids, mask, **kw)
    model.model.scan_layers = True
    scan = fcall(model, ids, mask, **kw)
    assert_close(f"{name} logits", f64(loop.logits), f64(scan.logits), dtype, "logits")
    for i, (a, b) in enumerate(zip(loop.hidden_states, scan.hidden_states)):
        assert_close(f"{name} hidden state {i}", f64(a), f64(b), dtype)
    for i, (a, b) in enumerate(zip(loop.attentions, scan.attentions)):
        assert_close(f"{name} attention weights {i}", f64(a), f64(b), dtype)
    if config.is_moe:
        for i, (a, b) in enumerate(zip(loop.router_logits, scan.router_logits)):
            assert_close(f"{name} router logits {i}", f64(a), f64(b), dtype)


def test_scan_decodes_through_a_cache_with_per_row_lengths():
    """One step on a filled cache whose rows sit at different positions (as the serving runner
    holds them): the scanned stack writes the same cache and gives the same logits as the loop."""
    name, dtype = "gemma2", "float64"
    config = CONFIGS[name]
    model = randomized_pair(config, dtype=dtype)[1]
    rng = np.random.default_rng(0)
    cache = flax_impl.KVCache.init(config, 2, 7, dtype=jnp.float64)
    cache = cache.replace(keys=tuple(jnp.asarray(rng.standard_normal(k.shape)) for k in cache.keys),
                          values=tuple(jnp.asarray(rng.standard_normal(v.shape)) for v in cache.values),
                          length=jnp.asarray([5, 2], jnp.int32))
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 1)))
    out = {}
    for scan in (False, True):
        model.model.scan_layers = scan
        out[scan] = fcall(model, ids, None, None, cache, use_cache=True)
    a, b = out[False], out[True]
    assert_close(f"{name} per-row step logits", f64(a.logits), f64(b.logits), dtype, "logits")
    np.testing.assert_array_equal(b.past_key_values.length, [6, 3])
    for i, (ka, kb) in enumerate(zip(a.past_key_values.keys + a.past_key_values.values,
                                     b.past_key_values.keys + b.past_key_values.values)):
        assert_close(f"{name} cache buffer {i}", f64(ka), f64(kb), dtype)


def stacks_in_decode_loop(model, ids, mask) -> list[tuple[int, ...]]:
    """Shapes of the `[L, ...]` layer-parameter stacks built inside `generate()`'s decode loop
    (the jaxpr of its while body, nested jaxprs included): traced, not compiled."""
    layers = model.model.layers
    shapes = {(len(layers),) + tuple(x.shape) for x in jax.tree.leaves(nnx.state(layers[0]))}
    captured = {}

    def capture(*args, **kwargs):
        captured.update(args=args, kwargs=kwargs)
        return (jnp.zeros((ids.shape[0], 0), jnp.int32),), 0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "_generate_compiled", capture)
        generate(model, ids, mask, max_new_tokens=2)
    # The unjitted function in a fresh partial: jit's cache would hand back an earlier trace.
    closed = jax.make_jaxpr(functools.partial(generation._generate_compiled.__wrapped__, **captured["kwargs"]))(
        *captured["args"])
    found = []

    def walk(jaxpr, in_loop: bool) -> None:
        for eqn in jaxpr.eqns:
            if in_loop and eqn.primitive.name in ("stack", "concatenate"):
                found.extend(s for v in eqn.outvars if (s := tuple(v.aval.shape)) in shapes)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub, in_loop or eqn.primitive.name == "while")

    walk(closed.jaxpr, False)
    return found


def test_scan_generates_the_loops_tokens_and_scores():
    """generate() with the layers scanned: the loop's tokens and scores; the stack of the layers'
    parameters is built once per call, before the decode loop (`reading_layer_stack`), and no step
    of the loop stacks them again."""
    config, dtype = CONFIGS["gemma2"], "float32"
    model = randomized_pair(config, dtype=dtype)[1]
    x = batch(config, b=3, t=5)  # 3 rows: no activation shares a shape with a [2, ...] stack
    ids, mask = x["input_ids"], x["attention_mask"]
    loop = generate(model, ids, mask, max_new_tokens=6, return_scores=True)
    model.model.scan_layers = True
    scan = generate(model, ids, mask, max_new_tokens=6, return_scores=True)
    np.testing.assert_array_equal(np.asarray(scan.sequences), np.asarray(loop.sequences))
    np.testing.assert_array_equal(np.asarray(scan.top_tokens), np.asarray(loop.top_tokens))
    for field in ("token_logprobs", "top_probs"):
        assert_close(f"generate() {field}", f64(getattr(loop, field)), f64(getattr(scan, field)), dtype, "logits")
    assert stacks_in_decode_loop(model, ids, mask) == []
    # The same check sees a stack built inside the loop (a forward outside any reading_layer_stack).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "reading_layer_stack", lambda model: contextlib.nullcontext())
        assert stacks_in_decode_loop(model, ids, mask)


def test_scan_refuses_layers_of_different_kinds():
    model = nnx.eval_shape(lambda: flax_impl.DecoderModel(TINY, rngs=nnx.Rngs(0)))  # shapes only
    assert same_structure(model.layers) is None
    set_attn_implementation(model.layers[1], "fast")
    model.scan_layers = True
    with pytest.raises(ValueError, match="layer 1's modules or static attributes differ from layer 0's"):
        nnx.eval_shape(lambda m: m(jnp.zeros((1, 3), jnp.int32)), model)  # traced, not run
