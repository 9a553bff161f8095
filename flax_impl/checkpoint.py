"""The Flax twin's side of the checkpoint format: NNX state <-> numpy arrays with HF names.

Parameter paths map to HF names by `weights.names`; linear kernels are the transpose of HF's
`[out, in]` weights.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights.names import hf_name, is_transposed


def state_to_numpy(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter as a numpy array in HF layout, keyed by its HF name."""
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = hf_name(path)
        value = np.asarray(var[...])
        out[name] = np.ascontiguousarray(value.T) if is_transposed(name) else value
    return out


def load_numpy_state(model: nnx.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy HF-named numpy arrays into the model's parameters (cast to each parameter's dtype).

    Every parameter must be present; extra names are an error too.
    """
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    names = {hf_name(path): (path, var) for path, var in flat}
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise KeyError(f"state mismatch: missing {missing}, unexpected {unexpected}")
    for name, (path, var) in names.items():
        value = tensors[name].T if is_transposed(name) else tensors[name]
        if tuple(value.shape) != tuple(var[...].shape):
            raise ValueError(f"{name}: expected shape {tuple(var[...].shape)[::-1] if is_transposed(name) else tuple(var[...].shape)}, "
                             f"found {tuple(tensors[name].shape)}")
        var[...] = jnp.asarray(value, dtype=var[...].dtype)
