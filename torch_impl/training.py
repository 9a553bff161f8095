"""Training the torch twin: AdamW with warmup + cosine and clipping, and `train_step` with
gradient accumulation. Mirrors `flax_impl/training.py` function for function.

The settings are `weights.shared.training.TrainingHParams` (one definition for both twins), the
schedule is `weights.shared.training.lr_factor` itself, and weight decay skips biases and norm
gains by HF name (`weights.shared.training.decays`). Remat (`gradient_checkpointing`) and dropout
live in the layers; `train_step` hands the layers their dropout key.

Gradient accumulation is exact: the batch is cut into `accumulation_steps` micro-batches of
equal rows, each micro-batch's loss is weighted by its share of the *whole batch's* counted
items (labels that are not ignored), so the accumulated gradient is the gradient of the loss
the whole batch would have in one step (HF's per-micro-batch mean would weight a micro-batch
with few labels like one with many). Dropout masks are drawn for each row's place in the whole
batch (on a data-parallel model, in the global batch: `_first_row`), so with dropout on it is
still the same step. On a data-parallel model the shares are of the global batch's counted items
(`_data_parallel_sum`), so ranks counting different numbers of labels still make its step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR

from weights.shared.dropout import dropout_key
from weights.shared.training import TrainingHParams, decays, learning_rate_at, lr_factor

from .heads import (IGNORE_INDEX, ForCausalLM, ForQuestionAnswering, ForSequenceClassification, causal_lm_loss,
                    cross_entropy, sequence_classification_loss)

__all__ = ["INPUT_KEYS", "Optimizer", "TrainingHParams", "accumulation_loss", "clip_grad_norm", "label_counts",
           "learning_rate_schedule", "loss_terms", "make_optimizer", "split_batch", "train_step"]

INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")  # the rest of a batch are the head's labels
LABEL_KEYS = {ForCausalLM: ("labels",), ForSequenceClassification: ("labels",),
              ForQuestionAnswering: ("start_positions", "end_positions")}


def learning_rate_schedule(hparams: TrainingHParams):
    """Optimizer step -> learning rate (`weights.shared.training.learning_rate_at`)."""
    return lambda step: learning_rate_at(hparams, step)


class Optimizer:
    """`torch.optim.AdamW` (two groups: with and without weight decay) and its `LambdaLR`
    schedule, stepped together. `step` counts the updates made, as `nnx.Optimizer.step` does."""

    def __init__(self, model: torch.nn.Module, hparams: TrainingHParams):
        self.hparams = hparams
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": hparams.weight_decay},
                  {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=hparams.learning_rate,
                                           betas=(hparams.adam_beta1, hparams.adam_beta2), eps=hparams.adam_epsilon)
        self.scheduler = LambdaLR(self.optimizer, lambda step: lr_factor(hparams, step))
        self.step = 0

    @property
    def learning_rate(self) -> float:
        """The learning rate the next update uses."""
        return self.scheduler.get_last_lr()[0]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def update(self) -> None:
        """Apply the gradients in the parameters' `.grad`, then advance the schedule."""
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1


def make_optimizer(model: torch.nn.Module, hparams: TrainingHParams) -> Optimizer:
    """AdamW with decoupled weight decay on every weight matrix and embedding (not on biases and
    norm gains), the warmup + cosine schedule, and `hparams.max_grad_norm` for `train_step`."""
    return Optimizer(model, hparams)


def split_batch(batch: Mapping[str, torch.Tensor], accumulation_steps: int) -> list[dict[str, torch.Tensor]]:
    """`accumulation_steps` micro-batches of equal rows, in order."""
    rows = next(iter(batch.values())).shape[0]
    if accumulation_steps < 1 or rows % accumulation_steps:
        raise ValueError(f"accumulation_steps={accumulation_steps} must be >= 1 and divide the batch's {rows} rows")
    chunks = {k: v.chunk(accumulation_steps) for k, v in batch.items()}
    return [{k: v[m] for k, v in chunks.items()} for m in range(accumulation_steps)]


def _problem_type(config: Any, labels: torch.Tensor) -> str:
    # As `heads.sequence_classification_loss` infers it when the config leaves it unset.
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.int32, torch.int64) else "multi_label_classification"


def label_counts(model: torch.nn.Module, labels: Mapping[str, torch.Tensor], seq_len: int) -> tuple[torch.Tensor, ...]:
    """The counted items (the denominator) of each of the head's loss terms (`loss_terms`)."""
    if isinstance(model, ForCausalLM):
        return ((labels["labels"][:, 1:] != IGNORE_INDEX).sum(),)  # position t predicts label t + 1
    if isinstance(model, ForSequenceClassification):
        y = labels["labels"]
        if _problem_type(model.config, y) == "single_label_classification":
            return ((y != IGNORE_INDEX).sum(),)
        return (torch.tensor(y.numel(), device=y.device),)  # MSE / BCE: a mean over every element
    # Question answering: positions are clamped to [0, T] and T is ignored (`question_answering_loss`).
    return tuple((labels[k].reshape(-1).clamp(0, seq_len) != seq_len).sum() for k in LABEL_KEYS[ForQuestionAnswering])


def loss_terms(model: torch.nn.Module, out: Any, labels: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The head's loss as terms, each a mean over its counted items: the head's loss is their
    mean (one term, or QA's start and end terms)."""
    if isinstance(model, ForCausalLM):
        return (causal_lm_loss(out.logits, labels["labels"]),)
    if isinstance(model, ForSequenceClassification):
        return (sequence_classification_loss(out.logits, labels["labels"], model.config),)
    seq_len = out.start_logits.shape[1]
    start, end = (labels[k].reshape(-1).clamp(0, seq_len) for k in LABEL_KEYS[ForQuestionAnswering])
    return cross_entropy(out.start_logits, start, seq_len), cross_entropy(out.end_logits, end, seq_len)


def accumulation_loss(model: torch.nn.Module, out: Any, labels: Mapping[str, torch.Tensor],
                      counts: tuple[torch.Tensor, ...], totals: tuple[torch.Tensor, ...],
                      accumulation_steps: int) -> torch.Tensor:
    """One micro-batch's part of the whole batch's loss: each term weighted by this micro-batch's
    share (`counts / totals`) of the whole batch's counted items; MoE's load-balancing loss
    (already a mean over the micro-batch's tokens) by 1 / accumulation_steps. Summed over the
    micro-batches it is the loss of the whole batch; with one micro-batch it is the head's own."""
    terms = loss_terms(model, out, labels)
    loss = sum(term * (count.to(term.dtype) / total.clamp(min=1).to(term.dtype))
               for term, count, total in zip(terms, counts, totals))
    loss = loss / len(terms)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss.to(loss.dtype) / accumulation_steps
    return loss


def clip_grad_norm(grads: list[torch.Tensor | None], max_norm: float | None) -> torch.Tensor:
    """Scale the gradients (the parameters' `.grad`; None for a parameter without one) in place so
    their global 2-norm is at most `max_norm` (factor `min(1, max_norm / (norm + 1e-6))`, torch's
    `clip_grad_norm_` written out); returns the norm before."""
    leaves = [g for g in grads if g is not None]
    # A sharded model's gradients are DTensors: each norm is the whole tensor's (reduced across
    # ranks, as a plain scalar), and each rank scales its own shard.
    norms = [torch.linalg.vector_norm(g) for g in leaves]
    total_norm = torch.linalg.vector_norm(torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n
                                                       for n in norms]))
    clip_coef = (math.inf if max_norm is None else max_norm) / (total_norm + 1e-6)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    for g in leaves:
        (g.to_local() if hasattr(g, "to_local") else g).mul_(clip_coef_clamped.to(g.dtype))
    return total_norm


def _label_keys(model: object) -> tuple[str, ...]:
    # By the head class among the model's bases: a sharded model may be an instance of a subclass
    # the engine generated (torch's FSDP2 `fully_shard` makes FSDPForCausalLM).
    return next(LABEL_KEYS[cls] for cls in type(model).__mro__ if cls in LABEL_KEYS)


def _data_parallel(model: torch.nn.Module) -> tuple[Any, tuple[str, ...]]:
    # The mesh the parameters live on (FSDP2 keeps them as DTensors on it) and its data-parallel
    # axes (`data`, `fsdp`: each rank of them is fed its own rows, `torch_impl.sharding.shard_model`);
    # none for tensor-parallel ranks (they share the whole batch) or an unsharded model.
    mesh = getattr(next(model.parameters(), None), "device_mesh", None)
    names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
    return mesh, tuple(axis for axis in ("data", "fsdp") if axis in names)


def _first_row(model: torch.nn.Module, rows: int) -> int:
    # This process's first row of the global batch. A data-parallel model is fed `rows` rows per
    # rank, data-major as the Flax twin lays a global batch over the same axes; its dropout masks
    # are those of its rows' places in the global batch, so the sharded step is the one-process step.
    mesh, axes = _data_parallel(model)
    index = 0
    for axis in axes:
        index = index * mesh.size(mesh.mesh_dim_names.index(axis)) + mesh.get_local_rank(axis)
    return index * rows


def _data_parallel_sum(model: torch.nn.Module, values: tuple[torch.Tensor, ...]
                       ) -> tuple[tuple[torch.Tensor, ...], int]:
    # The scalars `values` summed over the data-parallel ranks (all of them hold the sums), and how
    # many ranks that is (1 on a model that is not data-parallel: `values` unchanged).
    mesh, axes = _data_parallel(model)
    summed = torch.stack(values)
    ranks = 1
    for axis in axes:  # HSDP: over `fsdp`, then those sums over `data`
        torch.distributed.all_reduce(summed, group=mesh.get_group(axis))
        ranks *= mesh.size(mesh.mesh_dim_names.index(axis))
    return tuple(summed), ranks


def train_step(model: torch.nn.Module, optimizer: Optimizer, batch: Mapping[str, torch.Tensor], *,
               accumulation_steps: int = 1) -> dict[str, torch.Tensor]:
    """One optimizer update from `batch` (`input_ids`, optional `attention_mask` / `position_ids`,
    and the head's labels: `labels`, or `start_positions` and `end_positions`), its rows cut into
    `accumulation_steps` micro-batches run one after the other.

    The model stays where it is (device, train or eval mode); the batch must be where the model
    can read it. Returns tensors (no host sync): `loss` (the whole batch's), `grad_norm` (before
    clipping), `learning_rate` (of this update) and `tokens` (real input tokens).
    """
    unknown = set(batch) - set(INPUT_KEYS) - set(_label_keys(model))
    if unknown:
        raise ValueError(f"batch: unexpected keys {sorted(unknown)} for {type(model).__name__}; expected "
                         f"{INPUT_KEYS} and {_label_keys(model)}")
    split_batch(batch, accumulation_steps)  # checks the rows divide
    return _train_step(model, optimizer, dict(batch), accumulation_steps)


def _train_step(model: torch.nn.Module, optimizer: Optimizer, batch: dict[str, torch.Tensor],
                accumulation_steps: int) -> dict[str, torch.Tensor]:
    hparams = optimizer.hparams
    input_ids = batch["input_ids"]
    labels = {k: batch[k] for k in _label_keys(model)}
    totals = label_counts(model, labels, input_ids.shape[1])
    # Data-parallel ranks: the counted labels of the global batch (a Flax batch is global). FSDP2
    # averages the ranks' gradients, so a rank's labels weigh `ranks` times their share of the
    # global count: the step is the global batch's even when the ranks count different numbers.
    totals, ranks = _data_parallel_sum(model, totals)
    micro_batches = split_batch(batch, accumulation_steps)
    rows = input_ids.shape[0] // accumulation_steps
    first_row = _first_row(model, input_ids.shape[0])  # data-parallel ranks: their place in the global batch
    key = torch.from_numpy(dropout_key(hparams.seed, optimizer.step, first_row)).to(input_ids.device)
    optimizer.zero_grad()
    loss = 0.0
    for m, micro in enumerate(micro_batches):
        micro_key = key + torch.tensor([0, 0, m * rows], dtype=key.dtype, device=key.device)
        micro_labels = {k: micro[k] for k in labels}
        counts = tuple(count * ranks for count in label_counts(model, micro_labels, input_ids.shape[1]))
        out = model(**{k: micro[k] for k in INPUT_KEYS if k in micro}, dropout_key=micro_key)
        micro_loss = accumulation_loss(model, out, micro_labels, counts, totals, accumulation_steps)
        micro_loss.backward()  # adds this micro-batch's gradients into each parameter's .grad
        loss = loss + micro_loss.detach()
    loss = _data_parallel_sum(model, (loss,))[0][0] / ranks  # the global batch's, averaged as the gradients are
    grad_norm = clip_grad_norm([p.grad for p in model.parameters()], hparams.max_grad_norm)
    learning_rate = torch.tensor(optimizer.learning_rate, dtype=torch.float64)
    optimizer.update()
    mask = batch.get("attention_mask")
    tokens = mask.sum() if mask is not None else torch.tensor(input_ids.numel())
    return {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate, "tokens": tokens}
