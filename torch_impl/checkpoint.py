"""The torch twin's side of the checkpoint format: state <-> numpy arrays with HF names.

A torch `state_dict()` key *is* the HF tensor name, so no renaming happens here.
"""

from __future__ import annotations

from typing import Mapping

import ml_dtypes
import numpy as np
import torch
from torch import nn


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bfloat16 becomes `ml_dtypes.bfloat16`, bit for bit."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """A torch tensor from numpy; `ml_dtypes.bfloat16` becomes `torch.bfloat16`, bit for bit."""
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Every parameter as a numpy array, keyed by its HF name."""
    return {name: tensor_to_numpy(p) for name, p in model.state_dict().items()}


def load_numpy_state(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy HF-named numpy arrays into the model's parameters (cast to each parameter's dtype).

    Every parameter must be present; extra names are an error too.
    """
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise KeyError(f"state mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, param in state.items():
            value = numpy_to_tensor(tensors[name])
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{name}: expected shape {tuple(param.shape)}, found {tuple(value.shape)}")
            param.copy_(value.to(param.dtype))
