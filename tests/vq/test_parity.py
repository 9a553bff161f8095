"""Transformer-VQ cross-twin parity with the same weights (spec §6.3 units 14 and 15): log-probs,
losses, metrics and every state tensor; gradients of the composite loss, codebook included and
through the cache; parameters after two TBPTT train steps. Bounds from parity/tolerances.py."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax_impl.vq import train as ftrain
from parity.tolerances import TOLERANCES
from parity.vq.pairs import (build_vq_pair, flatten_tree, flax_forward, flax_grads_to_numpy, flax_spec,
                             max_abs_diff, torch_spec)
from parity.vq.strategies import fixture_config
from torch_impl.vq import checkpoint as tckpt
from torch_impl.vq import train as ttrain
from flax_impl.vq import checkpoint as fckpt


def _inputs(config, seed, batch=2):
    r = np.random.default_rng(seed)
    p = config.sequence_len
    tokens = r.integers(0, config.n_vocab, (batch, 2 * p + 1))
    mask = (r.random((batch, 2 * p)) < 0.8).astype(np.float64)
    return tokens, mask


def _check(name, ref, got, tol):
    err, scale = max_abs_diff(ref, got)
    assert err <= tol * max(1.0, scale), f"{name}: max abs error {err:.3e} > {tol:g} x max(1, {scale:.3g})"
    return err


CASES = {
    "float64-agg-tied": dict(),
    "float64-noagg-untied": dict(agg_cache=False, e_tie=False, pe_abs=False, e_preln=False, e_scale=0.5),
    "float32-agg-tied": dict(param_dtype="float32", dtype="float32", n_layer=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_parity_two_calls_with_carried_state(case):
    config = fixture_config(**CASES[case])
    tol = TOLERANCES[config.dtype]
    t_model, f_model = build_vq_pair(config, 1)
    tokens, mask = _inputs(config, 1)
    t_state = type(t_model).initial_state(config, 2)
    f_state = type(f_model).initial_state(config, 2)
    np_mask = mask.astype(np.float32 if config.dtype == "float32" else np.float64)
    for call in range(2):  # from the initial state, then from a mid-sequence state
        x, m = tokens[:, 12 * call:12 * call + 12], np_mask[:, 12 * call:12 * call + 12]
        with torch.no_grad():
            t_out = t_model(torch.tensor(x), t_state, torch_spec(m, 3), block_len=4, is_train=True)
        f_out = flax_forward(f_model, jnp.asarray(x), f_state, flax_spec(m, 3), 4, True)
        _check("logprobs", t_out["logprobs"], f_out["logprobs"], tol.logits)
        _check("l_commit", t_out["l_commit"], f_out["l_commit"], tol.loss)
        assert float(t_out["l_codebook"]) == 0.0 and float(f_out["l_codebook"]) == 0.0
        assert len(t_out["metrics"]) == 19
        _check("metrics", t_out["metrics"], f_out["metrics"], tol.activations)
        t_flat, f_flat = flatten_tree(t_out["attn_state"]), flatten_tree(f_out["attn_state"])
        for key in t_flat:
            if key.endswith(("z", "pos_offset")):  # codes and positions are integers: exact
                np.testing.assert_array_equal(t_flat[key], f_flat[key], err_msg=key)
            else:
                _check(key, t_flat[key], f_flat[key], tol.activations)
        t_state, f_state = t_out["attn_state"], f_out["attn_state"]


@nnx.jit
def _flax_grads(model, batch, state, spec):
    def loss(m):
        return ftrain.loss_fn(m, batch, state, spec, block_len=4)

    (value, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return value, out, grads


def test_gradient_parity_of_the_composite_loss():
    """Gradients of l_lm + beta l_commit + l_codebook for every parameter, the codebook included,
    with the gradient flowing through both caches across the 3 blocks of the call. One layer (two
    sublayers) keeps the compile of the Flax gradient short; the forward test covers two."""
    config = fixture_config(n_layer=1)
    tol = TOLERANCES["float64"]
    t_model, f_model = build_vq_pair(config, 2)
    tokens, mask = _inputs(config, 2)
    batch = dict(inputs=tokens[:, :12], targets=tokens[:, 1:13], loss_mask=mask[:, :12])
    t_batch = {k: torch.tensor(v) for k, v in batch.items()}
    t_loss, t_out = ttrain.loss_fn(t_model, t_batch, type(t_model).initial_state(config, 2),
                                   torch_spec(batch["loss_mask"], 3), block_len=4)
    t_loss.backward()
    t_grads = {n: p.grad.numpy() for n, p in t_model.named_parameters()}
    f_loss, f_out, f_grads = _flax_grads(f_model, {k: jnp.asarray(v) for k, v in batch.items()},
                                         type(f_model).initial_state(config, 2), flax_spec(batch["loss_mask"], 3))
    f_grads = flax_grads_to_numpy(f_grads, config)
    _check("loss", t_loss, f_loss, tol.loss)
    assert sorted(t_grads) == sorted(f_grads)
    for name in t_grads:
        _check(f"grad {name}", t_grads[name], f_grads[name], tol.gradients)
    for name in ("quantizer.c_sum", "quantizer.c_count", "q_proj.weight", "kvg_proj.weight", "u", "v"):
        assert np.abs(t_grads[f"transformer_layers.0.scanned_attn1.{name}"]).max() > 0, name
    # the codebook gradient is c - EMA target: SGD(lr=1) leaves gamma * c + (1 - gamma) * stats >= 0
    c_count = t_model.transformer_layers[0].scanned_attn1.quantizer.c_count.detach().numpy()
    stats = (c_count - t_grads["transformer_layers.0.scanned_attn1.quantizer.c_count"] - 0.99 * c_count) / 0.01
    np.testing.assert_allclose(stats.sum(axis=-1), batch["loss_mask"].sum(), atol=1e-9)


def test_train_step_parity_after_one_and_two_steps():
    """Two update chunks per sequence, state carried under stop-gradient; Adam on the main group
    and SGD(lr=1) on the codebook in both twins."""
    config = fixture_config(update_len=6, block_len=3, n_layer=1)
    tol = TOLERANCES["float64"]
    t_model, f_model = build_vq_pair(config, 4)
    tokens, mask = _inputs(config, 4)
    batch = dict(inputs=tokens[:, :12], targets=tokens[:, 1:13], loss_mask=mask[:, :12])
    t_opt, f_opt = ttrain.make_optimizer(t_model, 1e-2), ftrain.make_optimizer(f_model, 1e-2)
    before = tckpt.to_numpy(t_model)
    for step in range(2):
        t_metrics = ttrain.train_step(t_model, t_opt, {k: torch.tensor(v) for k, v in batch.items()})
        f_metrics = ftrain.train_step(f_model, f_opt, {k: jnp.asarray(v) for k, v in batch.items()})
        _check(f"metrics step {step}", t_metrics, f_metrics, tol.activations)
        t_params, f_params = tckpt.to_numpy(t_model), fckpt.to_numpy(f_model)
        for name in t_params:
            _check(f"param {name} step {step}", t_params[name], f_params[name], tol.gradients)
    after = tckpt.to_numpy(t_model)
    for name in before:  # every parameter moved, the codebook included
        if not name.endswith("bias_out"):
            assert np.abs(after[name] - before[name]).max() > 0, name
