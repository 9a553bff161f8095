"""Helpers for tests that run one module in both twins on the same numpy inputs."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from parity.compare import Comparison, compare, to_numpy
from parity.loading import copy_weights, jax_dtype, torch_dtype
from parity.tolerances import tolerance


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Give every parameter (norm gains and biases included) random values, so that no term
    of the computation hides behind an init of ones or zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
            p.copy_((noise + (1.0 if p.dim() == 1 and torch.all(p == 1) else 0.0)).to(p.dtype))


def layer_pair(name: str, *args: Any, dtype: str, seed: int = 0) -> tuple[torch.nn.Module, nnx.Module]:
    """One layer class built in both twins from the same constructor args, weights shared."""
    import flax_impl
    import torch_impl

    t_mod = getattr(torch_impl, name)(*args, dtype=torch_dtype(dtype))
    f_mod = getattr(flax_impl, name)(*args, dtype=jax_dtype(dtype), rngs=nnx.Rngs(seed))
    randomize(t_mod, seed)
    if name == "RMSNorm":
        # A bare norm's only tensor is named "weight", with no module name for the table to
        # classify; copy it directly (inside a model it is "<...>norm.weight").
        f_mod.weight[...] = to_jax(t_mod.weight.detach().double().numpy(), dtype)
    else:
        copy_weights(t_mod, f_mod)
    return t_mod, f_mod


_JITTED: dict[tuple, Any] = {}


def fcall(module: nnx.Module, *args: Any, **static: Any) -> Any:
    """Call a Flax module compiled. Hypothesis draws a fresh shape nearly every example, and one
    jit compile of the whole call is ~3x cheaper than eager mode's compile of every primitive;
    repeated shapes (decode steps) hit the cache of the one jitted function per static kwargs."""
    key = tuple(sorted(static.items()))
    if key not in _JITTED:
        _JITTED[key] = nnx.jit(lambda m, *a: m(*a, **static))
    return _JITTED[key](module, *args)


def to_torch(x: Any, dtype: str) -> Any:
    """numpy inputs -> torch: floats cast to `dtype`, ints and bools kept."""
    if isinstance(x, tuple):
        return tuple(to_torch(v, dtype) for v in x)
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(torch_dtype(dtype)) if x.dtype.kind == "f" else t
    return x


def to_jax(x: Any, dtype: str) -> Any:
    """numpy inputs -> jax: floats cast to `dtype` (same rounding as torch), ints and bools kept."""
    if isinstance(x, tuple):
        return tuple(to_jax(v, dtype) for v in x)
    if isinstance(x, np.ndarray):
        a = jnp.asarray(x)
        return a.astype(jax_dtype(dtype)) if x.dtype.kind == "f" else a
    return x


def assert_close(name: str, reference: Any, got: Any, dtype: str, quantity: str = "activations") -> Comparison:
    """Compare against the tolerance table; the failure message carries the figures."""
    c = compare(name, reference, got, tolerance(dtype, quantity))
    assert c.passed, (f"{name} ({dtype}): max abs {c.max_abs:.3e}, rel {c.rel:.3e} at {c.worst_index} "
                      f"> tol {c.tolerance:.0e}")
    return c


__all__ = ["assert_close", "fcall", "layer_pair", "randomize", "to_jax", "to_numpy", "to_torch"]
