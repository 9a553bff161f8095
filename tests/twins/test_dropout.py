"""Dropout that agrees across frameworks: both twins' on-device hash gives the numpy
specification's masks bit for bit, so in train mode the twins drop the same units and agree on
every output and gradient; the kept fraction is binomial; eval mode ignores p."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flax_impl.layers import dropout as flax_dropout
from parity import strategies as tst
from parity.inputs import seeded_batch
from parity.loading import twins_from_config
from tests.helpers.twins import assert_close, run_flax, run_torch
from torch_impl.layers import dropout as torch_dropout
from weights.names import hf_name, is_transposed
from weights.shared import dropout as spec

_FLAX_MASKS: dict = {}


def _flax_mask(key, shape, p, layer, site):
    # One compilation per (shape, p, layer, site): the key is traced, as under train_step.
    fn = _FLAX_MASKS.setdefault((shape, p, layer, site),
                                jax.jit(lambda k: flax_dropout.keep_mask(k, shape, p, layer, site)))
    return np.asarray(fn(jnp.asarray(key)))


@settings(max_examples=10)
@given(st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple), st.sampled_from([0.0, 0.1, 0.5, 0.97]),
       st.integers(-2 ** 40, 2 ** 40), st.integers(0, 2 ** 33), st.integers(-1, 40), st.sampled_from(sorted(spec.SITES)),
       st.integers(0, 2 ** 32))
# Larger than 2 of the torch twin's CPU blocks (`CPU_BLOCK_ELEMENTS` // 301 = 870 rows of 1800): the
# blocks and the short last one draw the specification's bits too.
@example(shape=(2, 3, 300, 301), p=0.1, seed=5, step=9, layer=3, site="attention", row_offset=7)
def test_twins_draw_the_specifications_masks(shape, p, seed, step, layer, site, row_offset):
    key = spec.dropout_key(seed, step, row_offset)
    expected = spec.keep_mask(seed, step, layer, site, shape, p, row_offset)
    got_torch = torch_dropout.keep_mask(torch.from_numpy(key), shape, p, layer, site).numpy()
    assert np.array_equal(got_torch, expected)
    assert np.array_equal(_flax_mask(key, shape, p, layer, site), expected)


# ---- dropout in the models ------------------------------------------------------------------
def _flax_loss_and_grads(model, batch, key):
    @nnx.jit
    def run(m, batch, key):
        def loss(m):
            out = m(**batch, dropout_key=key, output_hidden_states=True)
            return out.loss, out
        (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(m)
        return out, grads
    return run(model, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(key))


@settings(max_examples=2)
@given(tst.configs(families=True, sparse_routing=True), tst.heads(), st.sampled_from([0.1, 0.5]),
       st.sampled_from([0.0, 0.2]), st.integers(0, 2 ** 16))
def test_train_mode_dropout_is_identical_in_both_twins(config, head, p_attention, p_hidden, seed):
    """float64, train mode: every hidden state, the loss and every gradient agree across twins
    (the twins drop the same units); dropout changed the outputs; eval mode ignores p."""
    if head == "sequence_classification" and config.pad_token_id is None:
        head = "causal_lm"
    config = dataclasses.replace(config, attention_dropout=p_attention, hidden_dropout=p_hidden)
    twins = twins_from_config(config, head, "float64", seed)
    t_model, f_model = twins.pair
    b = seeded_batch(config, 3, 7, seed)
    batch = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "position_ids": b.position_ids,
             **b.head_labels(head)}
    key = spec.dropout_key(seed, 5)
    t_model.train()
    t_out = run_torch(t_model, batch, dropout_key=torch.from_numpy(key), output_hidden_states=True)
    t_out.loss.backward()
    f_model.train()
    f_out, f_grads = _flax_loss_and_grads(f_model, batch, key)
    for i, (t, f) in enumerate(zip(t_out.hidden_states, f_out.hidden_states)):
        assert_close(f"hidden state {i}", t, f, "float64")
    assert_close("loss", t_out.loss, f_out.loss, "float64", "loss")
    f_named = {hf_name(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(f_grads)}
    f_named = {k: v.T if is_transposed(k) else v for k, v in f_named.items()}
    for name, p in t_model.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        assert_close(name, ref, f_named[name], "float64", "gradients")
    t_model.eval()
    with torch.no_grad():
        eval_out = run_torch(t_model, batch, dropout_key=torch.from_numpy(key), output_hidden_states=True)
        plain = run_torch(twins_from_config(dataclasses.replace(config, attention_dropout=0.0, hidden_dropout=0.0),
                                            head, "float64", seed).torch_model, batch, output_hidden_states=True)
    assert not torch.equal(t_out.hidden_states[-1].detach(), eval_out.hidden_states[-1])  # dropout did something
    assert all(torch.equal(a, b) for a, b in zip(eval_out.hidden_states, plain.hidden_states))  # eval ignores p


@pytest.mark.parametrize("p", [0.1, 0.6])
def test_kept_fraction_of_the_twins_dropout_is_binomial(p):
    ones = np.ones((4, 8, 32, 32))
    key = spec.dropout_key(11, 2)
    t_drop = torch_dropout.Dropout(p, 3, "attention").train()
    f_drop = flax_dropout.Dropout(p, 3, "attention")
    kept_t = (t_drop(torch.from_numpy(ones), torch.from_numpy(key)) != 0).numpy()
    kept_f = np.asarray(f_drop(jnp.asarray(ones), jnp.asarray(key)) != 0)
    assert np.array_equal(kept_t, kept_f)
    n, q = kept_t.size, spec.keep_probability(p)
    assert abs(kept_t.sum() - n * q) <= 5 * math.sqrt(n * q * (1 - q))
    assert np.array_equal(t_drop.eval()(torch.from_numpy(ones), None).numpy(), ones)  # eval: identity, no key
    f_drop.eval()
    assert np.array_equal(np.asarray(f_drop(jnp.asarray(ones), None)), ones)


def test_train_mode_without_a_key_is_refused():
    config = dataclasses.replace(tst.family_examples()["llama2"], hidden_dropout=0.1)  # refused at the embeddings
    for model in twins_from_config(config, "causal_lm", "float64").pair:
        model.train()
        with pytest.raises(ValueError, match="needs a dropout_key"):
            (run_torch if isinstance(model, torch.nn.Module) else run_flax)(model, {"input_ids": np.ones((1, 3), np.int64)})


def test_loaded_twins_are_in_eval_mode(tmp_path):
    """from_pretrained (both twins, as HF's) and the parity loaders return inference-mode models:
    a checkpoint with p > 0 runs without a dropout key and the twins agree."""
    import flax_impl
    import torch_impl

    config = dataclasses.replace(tst.family_examples()["llama2"], attention_dropout=0.3, hidden_dropout=0.2)
    t_model, f_model = twins_from_config(config, "causal_lm", "float64").pair
    t_model.save_pretrained(tmp_path)
    batch = {"input_ids": np.ones((1, 5), np.int64)}
    for t, f in [(t_model, f_model), (torch_impl.ForCausalLM.from_pretrained(tmp_path),
                                      flax_impl.ForCausalLM.from_pretrained(tmp_path))]:
        assert not t.training and all(m.deterministic for _, m in nnx.iter_graph(f) if hasattr(m, "deterministic"))
        assert_close("logits", run_torch(t, batch).logits.detach().numpy(), np.asarray(run_flax(f, batch).logits), "float64",
                     "logits")
