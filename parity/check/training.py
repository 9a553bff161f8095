"""`twinlm check DIR --train-steps K`: K optimizer steps in both twins from one checkpoint.

Both twins start from the same weights, build the same optimizer (`TrainingHParams`, AdamW with
warmup + cosine, weight decay, clipping) and take K `train_step`s on the same seeded batches (a
new `seeded_batch` per step, rows padded left and right), in train mode (dropout on when the
config has any; the twins draw the same masks). After each step the report has the two twins'
loss, gradient norm and learning rate, and every parameter's difference, against the tolerance
table's "parameters" column: the torch twin is the reference, as in `check_pair`.

Adam divides each gradient element by its own running magnitude, so an element whose gradient
is within the twins' gradient tolerance of zero (relative to the model's largest gradient: an
invariant direction such as a QA head's bias under the softmax's shift invariance) has no agreed
sign, and each twin may step it by up to the learning rate either way. When a parameter is out
of the table's bound, its elements flagged so at any step (from the torch twin's gradients) are
held to `2 x (sum of the learning rates so far)`, the most two Adam steps can part, with a note
saying how many and how far; every other element is held to the table.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import flax_impl.training as flax_training
import torch_impl.training as torch_training
from flax_impl.checkpoint import state_to_numpy as flax_state
from torch_impl.checkpoint import state_to_numpy as torch_state
from weights.shared.training import TrainingHParams

from ..compare import compare
from ..inputs import Batch, seeded_batch
from ..loading import BadInputError, load_twins
from ..report import Report, Row
from ..tolerances import TOLERANCES, row_name, tolerance

__all__ = ["CHECK_HPARAMS", "check_training", "check_training_pair", "training_batch"]

# The check's optimizer: a warmup step (learning rate 0: Adam's moments move, the weights do not),
# then the cosine from a peak large enough that every parameter moves by many of its ulps.
CHECK_HPARAMS = dict(learning_rate=1e-3, weight_decay=0.1, warmup_steps=1, max_grad_norm=1.0)


def training_batch(batch: Batch, head: str, framework: str) -> dict[str, Any]:
    """A `train_step` batch (inputs and the head's labels) from a numpy `Batch`."""
    arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.position_ids is not None:
        arrays["position_ids"] = batch.position_ids
    arrays.update(batch.head_labels(head))
    convert = (lambda a: torch.from_numpy(np.ascontiguousarray(a))) if framework == "torch" else jnp.asarray
    return {k: convert(v) for k, v in arrays.items()}


def check_training_pair(torch_model: torch.nn.Module, flax_model: nnx.Module, batches: Sequence[Batch], head: str,
                        hparams: TrainingHParams, *, dtype: str, title: str = "training",
                        accumulation_steps: int = 1, param_dtype: str | None = None) -> Report:
    """Train both twins (same weights, same head) one `train_step` per batch; rows per step:
    loss, gradient norm, and every parameter after the step. Both twins end up trained. The
    bounds are the tolerance table's row of the run: `dtype`, or `dtype/param_dtype` when the
    parameters (AdamW's master weights, its moments with them) are stored in another dtype."""
    row = row_name(dtype, param_dtype)
    report = Report(title, dtype, head)
    report.meta["param_dtype"] = param_dtype or dtype
    report.meta["describe"] = {
        "training": f"{len(batches)} AdamW steps, accumulation {accumulation_steps}, train mode; "
                    + ", ".join(f"{k} {v}" for k, v in asdict(hparams).items())}
    report.meta["hparams"] = asdict(hparams)
    torch_model.train()
    flax_model.train()
    t_opt = torch_training.make_optimizer(torch_model, hparams)
    f_opt = flax_training.make_optimizer(flax_model, hparams)
    loss_tol, grad_tol, param_tol = (tolerance(row, q) for q in ("loss", "gradients", "parameters"))
    undetermined: dict[str, np.ndarray] = {}  # per parameter: elements whose gradient had no agreed sign
    lr_sum = 0.0
    for step, batch in enumerate(batches, start=1):
        t_metrics = torch_training.train_step(torch_model, t_opt, training_batch(batch, head, "torch"),
                                              accumulation_steps=accumulation_steps)
        grads = {name: np.abs(p.grad.detach().double().cpu().numpy()) if p.grad is not None else np.zeros(p.shape)
                 for name, p in torch_model.named_parameters()}
        largest = max(float(g.max(initial=0.0)) for g in grads.values())
        for name, g in grads.items():
            undetermined[name] = undetermined.get(name, np.zeros(g.shape, bool)) | (g <= grad_tol * largest)
        lr_sum += float(t_metrics["learning_rate"])
        f_metrics = flax_training.train_step(flax_model, f_opt, training_batch(batch, head, "flax"),
                                             accumulation_steps=accumulation_steps)
        section = f"step {step}"
        lr = float(t_metrics["learning_rate"])
        rows = [Row(section, "loss", compare("loss", t_metrics["loss"], f_metrics["loss"], loss_tol),
                    note=f"torch {float(t_metrics['loss']):.6g}, learning rate {lr:.3g}"),
                Row(section, "gradients", compare("grad norm (before clipping)", t_metrics["grad_norm"],
                                                  f_metrics["grad_norm"], grad_tol),
                    note=f"torch {float(t_metrics['grad_norm']):.6g}"),
                Row(section, "loss", compare("learning rate", t_metrics["learning_rate"],
                                             f_metrics["learning_rate"], loss_tol))]
        t_params, f_params = torch_state(torch_model), flax_state(flax_model)
        for name, value in t_params.items():
            rows.append(_parameter_row(section, name, value, f_params[name], param_tol,
                                       undetermined.get(name), 2 * lr_sum))
        report.rows += rows
    torch_model.eval()
    flax_model.eval()
    return report


def _parameter_row(section: str, name: str, t_value: np.ndarray, f_value: np.ndarray, tol: float,
                   undetermined: np.ndarray | None, adam_bound: float) -> Row:
    """One parameter after a step, against the table; when that fails, the table's bound on every
    element whose gradient direction the twins agree on and `adam_bound` on the others (see the
    module docstring), with a note."""
    t64, f64 = t_value.astype(np.float64), np.asarray(f_value).astype(np.float64)
    whole = compare(name, t_value, f_value, tol)
    if whole.passed or undetermined is None or not undetermined.any() or t64.shape != f64.shape:
        return Row(section, "parameters", whole, layer=_layer_of(name))
    scale = max(1.0, float(np.abs(t64).max()))
    c = compare(name, np.where(undetermined, 0.0, t64), np.where(undetermined, 0.0, f64), tol, scale)
    worst = float(np.abs(t64 - f64)[undetermined].max())
    note = (f"{int(undetermined.sum())} element(s) with a gradient within tolerance of 0 (no agreed sign for "
            f"Adam): max abs {worst:.1e}, bound 2 x sum(lr) = {adam_bound:.1e}")
    status = "pass" if c.passed and worst <= adam_bound else "fail"
    return Row(section, "parameters", c, layer=_layer_of(name), note=note, status=status)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def check_training(directory: str | os.PathLike, dtype: str = "float32", *, steps: int = 3, seq_len: int = 16,
                   batch_size: int = 3, seed: int = 0, accumulation_steps: int = 1, head: str | None = None,
                   flax_directory: str | os.PathLike | None = None, hparams: TrainingHParams | None = None,
                   param_dtype: str | None = None) -> Report:
    """Load `directory` into both twins, activations in `dtype` and parameters in `param_dtype`
    (default `dtype`; `dtype="bfloat16", param_dtype="float32"` is mixed precision: float32 master
    weights and AdamW moments, bfloat16 products, softmax and losses in float32), and take `steps`
    training steps in each on seeded batches (`seeded_batch(config, batch_size, seq_len, seed +
    step)`); see `check_training_pair`. `hparams` defaults to `CHECK_HPARAMS` with `max_steps = steps`."""
    if (param_dtype or dtype) == "float16":
        # Measured: NaN in both twins after one update (7 families x 3 heads). AdamW's epsilon
        # (1e-8) rounds to 0 in float16, so an element with no gradient (an unused embedding row)
        # steps by 0 / 0; float16 training also needs loss scaling, which twinlm does not do.
        raise BadInputError("training with float16 parameters gives NaN (AdamW's epsilon 1e-8 rounds to 0 in "
                            "float16): train in float32, or in bfloat16 with --param-dtype float32")
    row = row_name(dtype, param_dtype)
    if row not in TOLERANCES:
        raise BadInputError(f"no tolerance row for {row!r} (dtype {dtype}, parameters {param_dtype}); "
                            f"rows: {', '.join(TOLERANCES)}")
    if steps < 1:
        raise BadInputError(f"--train-steps must be >= 1, got {steps}")
    if batch_size < 2 or seq_len < 2:
        raise BadInputError(f"training batches need >= 2 rows and >= 2 tokens, got {batch_size} x {seq_len}")
    if batch_size % accumulation_steps:
        raise BadInputError(f"--accumulation-steps {accumulation_steps} must divide --batch {batch_size}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("a float64 check needs JAX's 64-bit mode")
    twins = load_twins(directory, dtype, head, flax_directory, param_dtype=param_dtype)
    config = twins.config
    if twins.head == "sequence_classification" and config.pad_token_id is None:
        raise BadInputError("training batches of several rows need config.pad_token_id for sequence classification")
    hparams = hparams or TrainingHParams(**CHECK_HPARAMS, max_steps=max(steps, CHECK_HPARAMS["warmup_steps"]))
    batches = [seeded_batch(config, batch_size, seq_len, seed + k) for k in range(steps)]
    report = check_training_pair(twins.torch_model, twins.flax_model, batches, twins.head, hparams, dtype=dtype,
                                 title=f"{directory} (train {steps} steps)", accumulation_steps=accumulation_steps,
                                 param_dtype=param_dtype)
    report.meta["checkpoint"] = str(directory)
    report.meta["seed"] = seed
    return report
