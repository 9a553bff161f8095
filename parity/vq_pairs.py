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
from weights.vq_config import TransformerVQConfig

__all__ = ["random_params", "build_vq_pair", "flatten_tree", "max_abs_diff"]


def random_params(config: TransformerVQConfig, seed: int) -> dict[str, np.ndarray]:
    """Torch-named numpy weights with every parameter non-trivial: the init has zeros for u, v,
    the biases and the ScaledSin scale, and ones for gains and counts, which would hide bugs.
    Codebook rows are drawn continuous, so they are distinct (pitfall P1); counts in [0.5, 3]."""
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
    t_model = tckpt.load_numpy(tvq.Transformer(config), params)
    f_model = fckpt.load_numpy(fvq.Transformer(config, rngs=nnx.Rngs(seed)), params)
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
        return {prefix[:-1]: tree.detach().cpu().numpy()}
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
