"""In each twin, decoding with the KV cache gives the outputs of one full forward pass.

The model is fed a prefix, then the rest token by token, through a static cache; step t must
equal position t of the full pass over the whole sequence (causality).

The exception is `dynamic` NTK rope past `max_position_embeddings`: its base depends on the
current length, so a full pass rotates every position with the base of the whole length, while
cached decoding (as in HF) rotates each new token with the base of the length so far and keeps
the cached keys as they were rotated when written. The two cannot agree there; the test asserts
agreement up to `max_position_embeddings` and the disagreement past it.
"""

import jax.numpy as jnp
import numpy as np
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import flax_impl
import torch_impl
from parity import strategies as tst
from parity.compare import compare
from parity.loading import twins_from_config
from parity.tolerances import tolerance
from tests.helpers.examples import PINS
from tests.helpers.twins import assert_close, fcall

TOL = tolerance("float64", "logits")  # same math, different order of summation


def torch_decode(model, ids, mask, pos, prefix, capacity):
    cache = torch_impl.KVCache.init(model.config, ids.shape[0], capacity, dtype=torch.float64)
    steps = [(0, prefix)] + [(t, t + 1) for t in range(prefix, ids.shape[1])]
    out = []
    with torch.no_grad():
        for a, b in steps:
            o = model(torch.from_numpy(ids[:, a:b]), torch.from_numpy(mask[:, :b]), torch.from_numpy(pos[:, a:b]),
                      past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            out.append(o.logits.numpy())
    assert (cache.length == ids.shape[1]).all()  # every row at its own (here: the same) position
    return np.concatenate(out, axis=1)


def flax_decode(model, ids, mask, pos, prefix, capacity):
    cache = flax_impl.KVCache.init(model.config, ids.shape[0], capacity, dtype=jnp.float64)
    steps = [(0, prefix)] + [(t, t + 1) for t in range(prefix, ids.shape[1])]
    out = []
    for a, b in steps:
        # The mask covers the whole capacity (width S), so every decode step has one shape.
        full_mask = np.zeros((ids.shape[0], capacity), np.int64)
        full_mask[:, :b] = mask[:, :b]
        o = fcall(model, jnp.asarray(ids[:, a:b]), jnp.asarray(full_mask), jnp.asarray(pos[:, a:b]), cache,
                  use_cache=True)
        cache = o.past_key_values
        out.append(np.asarray(o.logits))
    assert (np.asarray(cache.length) == ids.shape[1]).all()
    return np.concatenate(out, axis=1)


def full_pass(twin, model, ids, mask, pos):
    if twin == "torch":
        with torch.no_grad():
            return model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos)).logits.numpy()
    return np.asarray(fcall(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)).logits)


@example(case=PINS["llama3_gqa_both_sides"], prefix=2, spare=1, twin="flax")
@example(case=PINS["gemma2"], prefix=3, spare=0, twin="torch")
@example(case=PINS["mixtral"], prefix=1, spare=2, twin="torch")
@given(case=tst.cases(max_len=8, min_len=2), prefix=st.integers(1, 7), spare=st.integers(0, 3),
       twin=st.sampled_from(["torch", "flax"]))
def test_cached_decoding_equals_full_pass(case, prefix, spare, twin):
    config, batch = case
    b, t = batch.input_ids.shape
    prefix = min(prefix, t - 1)  # a prefix shorter than T: at least one one-token decode step
    capacity = t + spare  # spare slots must stay invisible
    pos = batch.position_ids if batch.position_ids is not None else np.broadcast_to(np.arange(t), (b, t)).copy()
    t_model, f_model = twins_from_config(config, "causal_lm", "float64", seed=1).pair
    model, decode = (t_model, torch_decode) if twin == "torch" else (f_model, flax_decode)
    cached = decode(model, batch.input_ids, batch.attention_mask, pos, prefix, capacity)
    full = full_pass(twin, model, batch.input_ids, batch.attention_mask, pos)
    keep = batch.attention_mask.astype(bool)  # padded positions produce no prediction anyone reads
    if config.rope.rope_type == "dynamic":  # the documented exception (module docstring)
        keep &= pos.max() + 1 <= config.max_position_embeddings
    c = compare("cached vs full", np.where(keep[..., None], full, 0), np.where(keep[..., None], cached, 0), TOL)
    assert c.passed, c


def test_dynamic_rope_past_max_positions_is_the_documented_exception():
    """Past max_position_embeddings, a full pass over the whole sequence uses one NTK base for
    every position, while cached decoding (like HF) uses the base of the length so far."""
    from weights.config import ModelConfig, RopeScaling

    config = ModelConfig(vocab_size=11, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=4, rope_scaling=RopeScaling("dynamic", 2.0))
    t_model, _ = twins_from_config(config, "causal_lm", "float64").pair
    ids = np.arange(1, 9)[None] % 11
    mask, pos = np.ones_like(ids), np.arange(8)[None]
    cached = torch_decode(t_model, ids, mask, pos, 1, 8)
    first_four = full_pass("torch", t_model, ids[:, :4], mask[:, :4], pos[:, :4])
    whole = full_pass("torch", t_model, ids, mask, pos)
    assert compare("within max positions", first_four, cached[:, :4], TOL).passed
    # A longer full pass changes even the first positions: their base follows the whole length.
    assert not compare("whole sequence, early positions", first_four, whole[:, :4], 1e-6).passed
    assert not compare("past max positions", whole[:, 4:], cached[:, 4:], 1e-6).passed


@example(case=PINS["llama3_gqa_both_sides"], twin="torch")
@given(case=tst.cases(tst.configs().map(lambda c: c if c.pad_token_id is not None else c.replace(pad_token_id=0)),
                      max_len=8, min_len=2),
       twin=st.sampled_from(["torch", "flax"]))
def test_padding_never_changes_other_positions(case, twin):
    """Changing the tokens under padding (left or right) leaves every real position's output
    unchanged, in each twin."""
    config, batch = case
    rng = np.random.default_rng(0)
    other = np.where(batch.attention_mask == 1, batch.input_ids, rng.integers(0, config.vocab_size, batch.input_ids.shape))
    t_model, f_model = twins_from_config(config, "causal_lm", "float64").pair
    outs = []
    for ids in (batch.input_ids, other):
        if twin == "torch":
            with torch.no_grad():
                outs.append(t_model(torch.from_numpy(ids), torch.from_numpy(batch.attention_mask)).logits.numpy())
        else:
            outs.append(np.asarray(fcall(f_model, jnp.asarray(ids), jnp.asarray(batch.attention_mask)).logits))
    keep = batch.attention_mask.astype(bool)[..., None]
    assert_close("real positions", np.where(keep, outs[0], 0), np.where(keep, outs[1], 0), "float64")



def test_a_write_past_the_capacity_grows_every_layer():
    """Outside jit a write past the capacity grows the buffers: each layer checks its own (the
    first layer's grown buffer says nothing of the second's)."""
    from tests.helpers.configs import TINY

    k, d = TINY.resolved_num_key_value_heads, TINY.resolved_head_dim
    new = np.random.default_rng(0).standard_normal((2, k, 3, d))
    t_cache = torch_impl.KVCache.init(TINY, 2, 2, dtype=torch.float64)
    f_cache = flax_impl.KVCache.init(TINY, 2, 2, dtype=jnp.float64)
    for layer in range(TINY.num_hidden_layers):
        t_cache, t_key, _ = t_cache.update(torch.from_numpy(new), torch.from_numpy(new), layer)
        f_cache, f_key, _ = f_cache.update(jnp.asarray(new), jnp.asarray(new), layer)
        for key in (t_key.numpy(), np.asarray(f_key)):
            assert key.shape[2] == 3
            np.testing.assert_array_equal(key, new)
