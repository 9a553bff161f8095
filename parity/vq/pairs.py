"""Transformer-VQ twins with shared weights, and helpers to compare their outputs and states."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flax import nnx

import flax_impl.vq as fvq
import torch_impl.vq as tvq
from flax_impl.vq import checkpoint as fckpt
from torch_impl.vq import checkpoint as tckpt
from weights.vq.config import TransformerVQConfig

__all__ = ["random_params", "build_vq_pair", "flatten_tree", "max_abs_diff", "torch_spec", "flax_spec",
           "flax_forward", "flax_grads_to_numpy"]


def random_params(config: TransformerVQConfig, seed: int) -> dict[str, np.ndarray]:
    """Torch-named numpy weights with every parameter non-trivial: the init has zeros for u, v,
    the biases and the ScaledSin scale, and ones for gains and counts, which would hide bugs.
    Codebook rows are drawn continuous, so they are distinct (no argmin near-ties); counts in [0.5, 3]."""
    torch.manual_seed(seed)
    names = tckpt.to_numpy(tvq.Transformer(config))
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in names.items():
        if name.endswith("c_count"):
            new = rng.uniform(0.5, 3.0, value.shape)
        elif name.endswith((".g", ".scale")):
            new = 1.0 + 0.3 * rng.standard_normal(value.shape)
        elif name.endswith((".b", ".u", ".v", "bias_out", "bias")):
            new = 0.3 * rng.standard_normal(value.shape)
        else:
            new = value
        out[name] = np.asarray(new, dtype=value.dtype)
    return out


def build_vq_pair(config: TransformerVQConfig, seed: int = 0,
                  params: dict[str, np.ndarray] | None = None) -> tuple[tvq.Transformer, fvq.Transformer]:
    """A torch and a Flax model holding the same weights (`random_params(config, seed)` by default)."""
    params = random_params(config, seed) if params is None else params
    t_model = tckpt.load_numpy(tckpt.abstract_model(config), params)
    f_model = fckpt.load_numpy(fckpt.abstract_model(config), params)
    return t_model, f_model


def flatten_tree(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts / lists of arrays (either framework) -> {dotted path: numpy array}."""
    if isinstance(tree, dict):
        out: dict[str, np.ndarray] = {}
        for k in sorted(tree):
            out.update(flatten_tree(tree[k], f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten_tree(v, f"{prefix}{i}."))
        return out
    if isinstance(tree, torch.Tensor):
        tree = tree.detach().cpu()
        # numpy has no bfloat16 in torch's bridge; float32 holds every bfloat16 value exactly
        return {prefix[:-1]: (tree.float() if tree.dtype == torch.bfloat16 else tree).numpy()}
    return {prefix[:-1]: np.asarray(tree)}


def max_abs_diff(a: Any, b: Any) -> tuple[float, float]:
    """(max |a - b|, max |a|) over matching leaves of two trees; raises on differing structure."""
    fa, fb = flatten_tree(a), flatten_tree(b)
    if sorted(fa) != sorted(fb):
        raise AssertionError(f"trees differ: {sorted(set(fa) ^ set(fb))[:5]}")
    err, scale = 0.0, 0.0
    for k in fa:
        x, y = fa[k].astype(np.float64), fb[k].astype(np.float64)
        if x.shape != y.shape:
            raise AssertionError(f"{k}: shapes {x.shape} vs {y.shape}")
        if x.size:
            err = max(err, float(np.max(np.abs(x - y))))
            scale = max(scale, float(np.max(np.abs(x))))
    return err, scale


def torch_spec(loss_mask: np.ndarray, n_block_per_update: int = 1, n_device: int = 1) -> tvq.VQSpec:
    """A torch VQSpec from a numpy [B, P] loss mask."""
    return tvq.VQSpec(torch.tensor([n_device]), torch.tensor([n_block_per_update]), torch.tensor(loss_mask))


def flax_spec(loss_mask: np.ndarray, n_block_per_update: int = 1, n_device: int = 1) -> fvq.VQSpec:
    """A Flax VQSpec from a numpy [B, P] loss mask."""
    import jax.numpy as jnp
    return fvq.VQSpec(jnp.array([n_device]), jnp.array([n_block_per_update]), jnp.asarray(loss_mask))


@nnx.jit(static_argnames=("block_len", "is_train"))
def flax_forward(model: fvq.Transformer, inputs, state, vq_spec, block_len: int, is_train: bool) -> dict:
    """The Flax twin's forward, compiled once per shape and block length (blocks under lax.scan)."""
    return model(inputs, state, vq_spec, block_len=block_len, is_train=is_train)


def flax_grads_to_numpy(grads: Any, config: TransformerVQConfig) -> dict[str, np.ndarray]:
    """An `nnx.grad` state of the Flax twin -> torch-named numpy arrays in torch layout."""
    from weights.names import flax_path, is_transposed
    from weights.vq.checkpoint import vq_param_shapes

    out = {}
    for name in vq_param_shapes(config):
        node = grads
        for part in flax_path(name):
            node = node[part]
        a = np.asarray(node[...] if hasattr(node, "get_value") or hasattr(node, "value") else node)
        out[name] = a.T if is_transposed(name) else a
    return out
