"""Checkpoints of the torch twin: numpy <-> module, safetensors save/load through `weights/`,
and the importer from the reference's Flax parameter tree."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch

from weights.vq.checkpoint import (import_reference_params, load_vq_checkpoint, save_vq_checkpoint,
                                   validate_tensors)
from weights.vq.config import TransformerVQConfig

from ..checkpoint import numpy_to_tensor, tensor_to_numpy  # the bit-exact bfloat16 bridge
from .model import Transformer

__all__ = ["abstract_model", "to_numpy", "load_numpy", "save_pretrained", "from_pretrained", "from_reference_params"]


def abstract_model(config: TransformerVQConfig) -> Transformer:
    """A model whose parameters are shapes only (meta device, no init), to be filled by `load_numpy`."""
    with torch.device("meta"):
        return Transformer(config)


def to_numpy(model: Transformer) -> dict[str, np.ndarray]:
    """Every parameter, named by the state dict, as numpy arrays (torch layout)."""
    return {k: tensor_to_numpy(v) for k, v in model.state_dict().items()}


def load_numpy(model: Transformer, tensors: Mapping[str, np.ndarray]) -> Transformer:
    """Copy torch-named numpy tensors into the model (names and shapes checked first)."""
    validate_tensors(model.config, tensors)
    current = model.state_dict()
    # np.array copies: the model must not share memory with the caller's arrays.
    state = {k: numpy_to_tensor(np.array(v)).to(current[k].dtype) for k, v in tensors.items()}
    # assign=True adopts the tensors, so a meta-device `abstract_model` becomes a real one.
    model.load_state_dict(state, strict=True, assign=True)
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
