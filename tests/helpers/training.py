"""Running both twins' `train_step` on the same numpy batches, and comparing what they end with."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

import flax_impl.training as flax_training
import torch_impl.training as torch_training
from flax_impl.checkpoint import state_to_numpy as flax_state
from parity.check.training import training_batch
from parity.inputs import Batch
from torch_impl.checkpoint import state_to_numpy as torch_state
from weights.shared.training import TrainingHParams


def train(model: Any, framework: str, batches: Sequence[Batch], head: str, hparams: TrainingHParams,
          accumulation_steps: int = 1) -> tuple[dict[str, np.ndarray], list[dict[str, float]]]:
    """Train one twin one `train_step` per batch, in train mode (dropout on when the config has
    any); (its parameters by HF name, per-step metrics)."""
    module = torch_training if framework == "torch" else flax_training
    model.train()
    optimizer = module.make_optimizer(model, hparams)
    metrics = []
    for batch in batches:
        m = module.train_step(model, optimizer, training_batch(batch, head, framework),
                              accumulation_steps=accumulation_steps)
        metrics.append({k: float(v) for k, v in m.items()})
    return (torch_state if framework == "torch" else flax_state)(model), metrics


def worst_relative(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[str, float]:
    """The parameter with the largest `max|got - ref| / max(1, max|ref|)`, and that figure."""
    assert reference.keys() == got.keys()
    errors = {k: float(np.abs(got[k].astype(np.float64) - reference[k]).max()
                       / max(1.0, float(np.abs(reference[k]).max()))) for k in reference}
    name = max(errors, key=errors.get)
    return name, errors[name]
