"""Per-layer parity: each core layer, built in both twins with the same weights (copied through
the `weights/` name and layout rules), gives the same outputs on hypothesis-drawn configs,
shapes, rope variants, padding and positions far from 0."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flax_impl
import torch_impl
from parity import strategies as tst
from tests.helpers.twins import assert_close, fcall, layer_pair, to_jax, to_torch


def hidden(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


def keep_mask(config, batch) -> np.ndarray:
    b, t = batch.input_ids.shape
    return torch_impl.model.make_attention_mask(torch.from_numpy(batch.attention_mask), b, t, t, 0).numpy()


def rope_pair(config):
    """Rotary embeddings hold no parameters: each twin builds its own from the config."""
    return torch_impl.RotaryEmbedding(config), flax_impl.RotaryEmbedding(config)


def positions(batch) -> np.ndarray:
    b, t = batch.input_ids.shape
    return batch.position_ids if batch.position_ids is not None else np.broadcast_to(np.arange(t), (b, t)).copy()


@given(tst.configs(), tst.data(), tst.dtypes())
def test_rms_norm(config, data, dtype):
    rng = np.random.default_rng(data.draw(st.integers(0, 999)))
    t_mod, f_mod = layer_pair("RMSNorm", config.hidden_size, config.rms_norm_eps, dtype=dtype)
    x = hidden(rng, 2, 3, config.hidden_size) * data.draw(st.sampled_from([1e-3, 1.0, 30.0]))
    assert_close("RMSNorm", t_mod(to_torch(x, dtype)), fcall(f_mod, to_jax(x, dtype)), dtype)


@given(tst.configs(), tst.data(), tst.dtypes())
def test_rotary_embedding(config, data, dtype):
    batch = data.draw(tst.batches(config))
    pos = positions(batch)
    t_mod, f_mod = rope_pair(config)
    x = np.zeros((1,))
    t_cos, t_sin = t_mod(to_torch(x, dtype), torch.from_numpy(pos))
    f_cos, f_sin = fcall(f_mod, to_jax(x, dtype), to_jax(pos, dtype))
    assert_close("cos", t_cos, f_cos, dtype)
    assert_close("sin", t_sin, f_sin, dtype)


@given(tst.configs(), tst.data(), tst.dtypes())
def test_attention(config, data, dtype):
    batch = data.draw(tst.batches(config))
    b, t = batch.input_ids.shape
    rng = np.random.default_rng(data.draw(st.integers(0, 999)))
    t_mod, f_mod = layer_pair("Attention", config, 0, dtype=dtype)
    x = hidden(rng, b, t, config.hidden_size)
    rope_t, rope_f = rope_pair(config)
    pos = positions(batch)
    t_pe = rope_t(to_torch(x, dtype), torch.from_numpy(pos))
    f_pe = fcall(rope_f, to_jax(x, dtype), to_jax(pos, dtype))
    mask = keep_mask(config, batch)
    t_out, t_w, _ = t_mod(to_torch(x, dtype), t_pe, torch.from_numpy(mask))
    f_out, f_w, _ = fcall(f_mod, to_jax(x, dtype), f_pe, to_jax(mask, dtype))
    assert_close("attention output", t_out, f_out, dtype)
    assert_close("attention weights", t_w, f_w, dtype)


@given(tst.configs(), tst.data(), tst.dtypes())
def test_mlp(config, data, dtype):
    rng = np.random.default_rng(data.draw(st.integers(0, 999)))
    t_mod, f_mod = layer_pair("MLP", config, dtype=dtype)
    x = hidden(rng, 2, 5, config.hidden_size)
    assert_close("MLP", t_mod(to_torch(x, dtype)), fcall(f_mod, to_jax(x, dtype)), dtype)


@given(tst.configs(), tst.data(), tst.dtypes())
def test_decoder_layer(config, data, dtype):
    batch = data.draw(tst.batches(config))
    b, t = batch.input_ids.shape
    rng = np.random.default_rng(data.draw(st.integers(0, 999)))
    t_mod, f_mod = layer_pair("DecoderLayer", config, 0, dtype=dtype)
    rope_t, rope_f = rope_pair(config)
    x = hidden(rng, b, t, config.hidden_size)
    pos = positions(batch)
    mask = keep_mask(config, batch)
    t_out = t_mod(to_torch(x, dtype), rope_t(to_torch(x, dtype), torch.from_numpy(pos)), torch.from_numpy(mask))
    f_out = fcall(f_mod, to_jax(x, dtype), fcall(rope_f, to_jax(x, dtype), to_jax(pos, dtype)), to_jax(mask, dtype))
    assert_close("decoder layer", t_out[0], f_out[0], dtype)
    assert_close("attention weights", t_out[1], f_out[1], dtype)


@settings(max_examples=min(15, settings.default.max_examples))  # the CI profile bounds it too
@given(tst.configs(), tst.data(), tst.dtypes())
def test_decoder_model_every_hidden_state(config, data, dtype):
    batch = data.draw(tst.batches(config))
    t_mod, f_mod = layer_pair("DecoderModel", config, dtype=dtype)
    pos = batch.position_ids
    t_out = t_mod(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask),
                  None if pos is None else torch.from_numpy(pos), output_hidden_states=True, output_attentions=True)
    f_out = fcall(f_mod, to_jax(batch.input_ids, dtype), to_jax(batch.attention_mask, dtype),
                  None if pos is None else to_jax(pos, dtype), output_hidden_states=True, output_attentions=True)
    assert len(t_out.hidden_states) == len(f_out.hidden_states) == config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(t_out.hidden_states, f_out.hidden_states)):
        assert_close(f"hidden_states[{i}]", a, b, dtype)
    for i, (a, b) in enumerate(zip(t_out.attentions, f_out.attentions)):
        assert_close(f"attentions[{i}]", a, b, dtype)
    assert_close("last_hidden_state", t_out.last_hidden_state, f_out.last_hidden_state, dtype)
