"""Checkpoints of the Flax twin: numpy <-> module, safetensors save/load through `weights/`,
and the importer from the reference's Flax parameter tree."""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights.names import flax_path, is_transposed
from weights.vq.checkpoint import (import_reference_params, load_vq_checkpoint, save_vq_checkpoint,
                                   validate_tensors, vq_param_shapes)
from weights.vq.config import TransformerVQConfig

from .model import Transformer

__all__ = ["abstract_model", "to_numpy", "load_numpy", "save_pretrained", "from_pretrained",
           "from_reference_params"]


def abstract_model(config: TransformerVQConfig) -> Transformer:
    """A model whose parameters are shapes only (no random init), to be filled by `load_numpy`.
    Skipping the init matters: each distinct parameter shape would compile a PRNG kernel."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def _variable(model: Transformer, name: str) -> nnx.Variable:
    obj: Any = model
    for part in flax_path(name):
        obj = obj[part] if isinstance(part, int) else getattr(obj, part)
    return obj


def to_numpy(model: Transformer) -> dict[str, np.ndarray]:
    """Every parameter, named like the torch state dict, as numpy arrays (torch layout)."""
    out = {}
    for name in vq_param_shapes(model.config):
        a = np.asarray(_variable(model, name)[...])
        out[name] = np.array(a.T, order="C") if is_transposed(name) else a.copy()
    return out


def load_numpy(model: Transformer, tensors: Mapping[str, np.ndarray]) -> Transformer:
    """Copy torch-named numpy tensors into the model (names and shapes checked first)."""
    validate_tensors(model.config, tensors)
    for name, value in tensors.items():
        var = _variable(model, name)
        a = np.asarray(value)
        # get_raw_value: on an `abstract_model` the value is a ShapeDtypeStruct, not an array
        var.set_value(jnp.asarray(a.T if is_transposed(name) else a, dtype=var.get_raw_value().dtype))
    return model


def save_pretrained(model: Transformer, directory: str | os.PathLike) -> None:
    """Write `config.json` + `model.safetensors`."""
    save_vq_checkpoint(directory, model.config, to_numpy(model))


def from_pretrained(directory: str | os.PathLike) -> Transformer:
    """Build a model from a directory written by either twin."""
    config, tensors = load_vq_checkpoint(directory)
    return load_numpy(abstract_model(config), tensors)


def from_reference_params(tree: Mapping[str, Any], config: TransformerVQConfig) -> Transformer:
    """A model holding the weights of the official Flax parameter tree (see `weights.vq.checkpoint`)."""
    return load_numpy(abstract_model(config), import_reference_params(tree, config))
