"""Training the Flax twin: AdamW with warmup + cosine and clipping, and `train_step` with
gradient accumulation. Mirrors `torch_impl/training.py` function for function.

The settings are `weights.shared.training.TrainingHParams` (one definition for both twins), the
schedule is `weights.shared.training.lr_factor` written in jnp, and weight decay skips biases and
norm gains by HF name (`weights.shared.training.decays`). Remat (`gradient_checkpointing`) and
dropout live in the layers; `train_step` hands the layers their dropout key.

Gradient accumulation is exact: the batch is cut into `accumulation_steps` micro-batches of
equal rows, each micro-batch's loss is weighted by its share of the *whole batch's* counted
items (labels that are not ignored), so the accumulated gradient is the gradient of the loss
the whole batch would have in one step. Dropout masks are drawn for each row's place in the
whole batch, so with dropout on it is still the same step.

`train_step` is one compiled program per batch shape and `accumulation_steps` (`nnx.jit`); the
micro-batches run in a `jax.lax.scan`, one after the other (their activations are never alive
together), and the model's and optimizer's buffers are donated, so the update happens in place.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from weights.names import hf_name, tree_path_names
from weights.shared.dropout import dropout_key
from weights.shared.training import TrainingHParams, decays

from .heads import (IGNORE_INDEX, ForCausalLM, ForQuestionAnswering, ForSequenceClassification, causal_lm_loss,
                    cross_entropy, sequence_classification_loss)
from .layers.precision import compute_dtype

__all__ = ["INPUT_KEYS", "Optimizer", "TrainingHParams", "accumulation_loss", "clip_grad_norm", "label_counts",
           "learning_rate_schedule", "loss_terms", "make_optimizer", "split_batch", "train_step"]

INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")  # the rest of a batch are the head's labels
LABEL_KEYS = {ForCausalLM: ("labels",), ForSequenceClassification: ("labels",),
              ForQuestionAnswering: ("start_positions", "end_positions")}


def learning_rate_schedule(hparams: TrainingHParams) -> optax.Schedule:
    """Optimizer step -> learning rate: `weights.shared.training.learning_rate_at` in jnp."""
    warmup, decay_steps = hparams.warmup_steps, max(1, hparams.max_steps - hparams.warmup_steps)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step).astype(jnp.result_type(float))
        warm = step / max(1, warmup)
        progress = jnp.minimum(step - warmup, hparams.max_steps - warmup) / decay_steps
        factor = jnp.where(step < warmup, warm, 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        return hparams.learning_rate * factor

    return schedule


def _decay_mask(params: Any) -> Any:
    # True where weight decay applies (optax calls this on the parameters' pytree).
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(hf_name(tree_path_names(path))), params)


class Optimizer(nnx.Optimizer):
    """`optax.adamw` (weight decay masked off biases and norm gains) on the warmup + cosine
    schedule, over the model's `nnx.Param`s; `hparams` rides along as static metadata."""

    def __init__(self, model: nnx.Module, hparams: TrainingHParams):
        tx = optax.adamw(learning_rate_schedule(hparams), b1=hparams.adam_beta1, b2=hparams.adam_beta2,
                         eps=hparams.adam_epsilon, weight_decay=hparams.weight_decay, mask=_decay_mask)
        super().__init__(model, tx, wrt=nnx.Param)
        self.hparams = hparams

    @property
    def learning_rate(self) -> jax.Array:
        """The learning rate the next update uses."""
        return learning_rate_schedule(self.hparams)(self.step[...])


def make_optimizer(model: nnx.Module, hparams: TrainingHParams) -> Optimizer:
    """AdamW with decoupled weight decay on every weight matrix and embedding (not on biases and
    norm gains), the warmup + cosine schedule, and `hparams.max_grad_norm` for `train_step`."""
    return Optimizer(model, hparams)


def split_batch(batch: Mapping[str, jax.Array], accumulation_steps: int) -> dict[str, jax.Array]:
    """`accumulation_steps` micro-batches of equal rows, stacked on a new leading axis, in order."""
    rows = next(iter(batch.values())).shape[0]
    if accumulation_steps < 1 or rows % accumulation_steps:
        raise ValueError(f"accumulation_steps={accumulation_steps} must be >= 1 and divide the batch's {rows} rows")
    return {k: v.reshape((accumulation_steps, rows // accumulation_steps) + v.shape[1:]) for k, v in batch.items()}


def _problem_type(config: Any, labels: jax.Array) -> str:
    # As `heads.sequence_classification_loss` infers it when the config leaves it unset.
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    return "single_label_classification" if jnp.issubdtype(labels.dtype, jnp.integer) else "multi_label_classification"


def label_counts(model: nnx.Module, labels: Mapping[str, jax.Array], seq_len: int) -> tuple[jax.Array, ...]:
    """The counted items (the denominator) of each of the head's loss terms (`loss_terms`)."""
    if isinstance(model, ForCausalLM):
        return ((labels["labels"][:, 1:] != IGNORE_INDEX).sum(),)  # position t predicts label t + 1
    if isinstance(model, ForSequenceClassification):
        y = labels["labels"]
        if _problem_type(model.config, y) == "single_label_classification":
            return ((y != IGNORE_INDEX).sum(),)
        return (jnp.asarray(y.size),)  # MSE / BCE: a mean over every element
    # Question answering: positions are clamped to [0, T] and T is ignored (`question_answering_loss`).
    return tuple((jnp.clip(labels[k].reshape(-1), 0, seq_len) != seq_len).sum() for k in LABEL_KEYS[ForQuestionAnswering])


def loss_terms(model: nnx.Module, out: Any, labels: Mapping[str, jax.Array]) -> tuple[jax.Array, ...]:
    """The head's loss as terms, each a mean over its counted items: the head's loss is their
    mean (one term, or QA's start and end terms)."""
    if isinstance(model, ForCausalLM):
        return (causal_lm_loss(out.logits, labels["labels"]),)
    if isinstance(model, ForSequenceClassification):
        return (sequence_classification_loss(out.logits, labels["labels"], model.config),)
    seq_len = out.start_logits.shape[1]
    start, end = (jnp.clip(labels[k].reshape(-1), 0, seq_len) for k in LABEL_KEYS[ForQuestionAnswering])
    return cross_entropy(out.start_logits, start, seq_len), cross_entropy(out.end_logits, end, seq_len)


def accumulation_loss(model: nnx.Module, out: Any, labels: Mapping[str, jax.Array],
                      counts: tuple[jax.Array, ...], totals: tuple[jax.Array, ...],
                      accumulation_steps: int) -> jax.Array:
    """One micro-batch's part of the whole batch's loss: each term weighted by this micro-batch's
    share (`counts / totals`) of the whole batch's counted items; MoE's load-balancing loss
    (already a mean over the micro-batch's tokens) by 1 / accumulation_steps. Summed over the
    micro-batches it is the loss of the whole batch; with one micro-batch it is the head's own."""
    terms = loss_terms(model, out, labels)
    loss = sum(term * (count.astype(term.dtype) / jnp.maximum(total, 1).astype(term.dtype))
               for term, count, total in zip(terms, counts, totals))
    loss = loss / len(terms)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss.astype(loss.dtype) / accumulation_steps
    return loss


def clip_grad_norm(grads: Any, max_norm: float | None) -> tuple[Any, jax.Array]:
    """Scale the gradients so their global 2-norm is at most `max_norm` (torch's
    `clip_grad_norm_`: factor `min(1, max_norm / (norm + 1e-6))`); returns them and the norm before."""
    leaves = jax.tree.leaves(grads)
    total_norm = jnp.linalg.norm(jnp.stack([jnp.linalg.norm(g.ravel()) for g in leaves]))
    clip_coef = (math.inf if max_norm is None else max_norm) / (total_norm + 1e-6)
    clip_coef_clamped = jnp.minimum(clip_coef, 1.0)
    return jax.tree.map(lambda g: g * clip_coef_clamped.astype(g.dtype), grads), total_norm


def _label_keys(model: object) -> tuple[str, ...]:
    # By the head class among the model's bases: a sharded model may be an instance of a subclass
    # the engine generated (torch's FSDP2 `fully_shard` makes FSDPForCausalLM).
    return next(LABEL_KEYS[cls] for cls in type(model).__mro__ if cls in LABEL_KEYS)


def train_step(model: nnx.Module, optimizer: Optimizer, batch: Mapping[str, jax.Array], *,
               accumulation_steps: int = 1) -> dict[str, jax.Array]:
    """One optimizer update from `batch` (`input_ids`, optional `attention_mask` / `position_ids`,
    and the head's labels: `labels`, or `start_positions` and `end_positions`), its rows cut into
    `accumulation_steps` micro-batches run one after the other.

    Compiled once per batch shape (and train / eval mode); the model and optimizer are updated in
    place, their old buffers donated. Placement follows the arrays given (a model and batch laid
    out on a mesh stay there). Returns arrays (no host sync): `loss` (the whole batch's),
    `grad_norm` (before clipping), `learning_rate` (of this update) and `tokens` (real input tokens).
    """
    unknown = set(batch) - set(INPUT_KEYS) - set(_label_keys(model))
    if unknown:
        raise ValueError(f"batch: unexpected keys {sorted(unknown)} for {type(model).__name__}; expected "
                         f"{INPUT_KEYS} and {_label_keys(model)}")
    split_batch(batch, accumulation_steps)  # checks the rows divide, before compiling
    return _train_step(model, optimizer, dict(batch), accumulation_steps)


@functools.partial(nnx.jit, static_argnames=("accumulation_steps",), donate_argnames=("model", "optimizer"))
def _train_step(model: nnx.Module, optimizer: Optimizer, batch: dict[str, jax.Array],
                accumulation_steps: int) -> dict[str, jax.Array]:
    hparams = optimizer.hparams
    input_ids = batch["input_ids"]
    labels = {k: batch[k] for k in _label_keys(model)}
    totals = label_counts(model, labels, input_ids.shape[1])
    micro_batches = split_batch(batch, accumulation_steps)
    rows = input_ids.shape[0] // accumulation_steps
    key = jnp.asarray(dropout_key(hparams.seed, 0)).at[1].set(optimizer.step[...].astype(jnp.int32))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_dtype = compute_dtype(model.model.embed_tokens.dtype)

    def micro_step(carry: tuple[Any, jax.Array], m_micro: tuple[jax.Array, dict]) -> tuple[tuple[Any, jax.Array], None]:
        grads, loss = carry
        m, micro = m_micro
        micro_key = key + jnp.stack([0, 0, m * rows]).astype(key.dtype)
        micro_labels = {k: micro[k] for k in labels}
        counts = label_counts(model, micro_labels, input_ids.shape[1])

        def micro_loss_fn(p: Any) -> jax.Array:
            micro_model = nnx.merge(graphdef, p, rest)
            out = micro_model(**{k: micro[k] for k in INPUT_KEYS if k in micro}, dropout_key=micro_key)
            return accumulation_loss(micro_model, out, micro_labels, counts, totals, accumulation_steps)

        micro_loss, micro_grads = jax.value_and_grad(micro_loss_fn)(params)
        return (jax.tree.map(jnp.add, grads, micro_grads), loss + micro_loss), None

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), loss_dtype))
    steps = jnp.arange(accumulation_steps, dtype=jnp.int32)
    (grads, loss), _ = jax.lax.scan(micro_step, zeros, (steps, micro_batches))
    grads, grad_norm = clip_grad_norm(grads, hparams.max_grad_norm)
    learning_rate = optimizer.learning_rate
    optimizer.update(model, grads)
    mask = batch.get("attention_mask")
    tokens = mask.sum() if mask is not None else jnp.asarray(input_ids.size)
    return {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate, "tokens": tokens}
