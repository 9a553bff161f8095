"""Transformer-VQ dropout structure (spec §6.3 unit 17), within each twin: LayerDrop drops a
whole sublayer per batch row, the same rows in every block of the call."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import flax_impl.vq as F
import torch_impl.vq as T
from parity.vq.strategies import fixture_config


def _check_layerdrop(diff):
    """diff [N, B, L, E] = sublayer output - input: per row, all zero (dropped) or none zero."""
    per_row = np.abs(diff).reshape(diff.shape[0], diff.shape[1], -1)
    dropped = np.all(per_row == 0, axis=(0, 2))
    kept = np.all(per_row != 0, axis=(0, 2))
    assert np.all(dropped | kept), "a row is dropped in some blocks and kept in others"
    assert dropped.any() and kept.any()  # p = 0.5 over 8 rows: this seed draws both


def test_layerdrop_is_one_draw_per_row_shared_by_blocks():
    config = fixture_config(p_droplyr=0.5, n_layer=1)
    x = np.random.default_rng(0).standard_normal((3, 8, 2, config.d_model))  # [N, B, L, E]
    mask = np.ones((8, 6))
    torch.manual_seed(0)
    t_layer = T.TransformerLayer(config)
    specs = T.model.get_blocks_of_vq_spec(T.VQSpec(torch.tensor([1]), torch.tensor([3]), torch.tensor(mask)), 2)
    with torch.no_grad():
        out, _, _ = t_layer._sublayer(t_layer.scanned_attn1, torch.tensor(x), T.VQAttention.initial_state(config, 8),
                                      specs, True, torch.Generator().manual_seed(1))
    _check_layerdrop(out.numpy() - x)
    f_layer = F.TransformerLayer(config, rngs=nnx.Rngs(0))
    f_specs = F.model.get_blocks_of_vq_spec(F.VQSpec(jnp.array([1]), jnp.array([3]), jnp.asarray(mask)), 2)
    out = _flax_sublayer(f_layer, jnp.asarray(x), F.VQAttention.initial_state(config, 8), f_specs, jax.random.key(1))
    _check_layerdrop(np.asarray(out) - x)


@nnx.jit
def _flax_sublayer(layer, x, state, specs, rng):
    return layer._sublayer(layer.scanned_attn1, x, state, specs, True, rng)[0]
