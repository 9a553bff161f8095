"""What both twins' `training.py` share, in plain Python: the hyper-parameters, the learning-rate
schedule and the weight-decay rule.

`TrainingHParams` is the one definition of the optimizer's settings (names as in HF
`TrainingArguments`); `learning_rate_at` is the schedule's specification, the function the torch
twin's `LambdaLR` calls and the Flax twin's optax schedule is tested against step by step;
`decays` says which parameters weight decay applies to, by HF name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TrainingHParams", "decays", "learning_rate_at", "lr_factor"]


@dataclass(frozen=True)
class TrainingHParams:
    """AdamW with decoupled weight decay, linear warmup then cosine decay, global-norm clipping.

    Frozen and hashable: the Flax twin keeps it as static optimizer metadata.
    """

    learning_rate: float = 5e-5  # peak learning rate, reached at the end of the warmup
    weight_decay: float = 0.0  # decoupled (AdamW) decay; never on biases and norm weights (`decays`)
    adam_beta1: float = 0.9  # first-moment decay
    adam_beta2: float = 0.999  # second-moment decay
    adam_epsilon: float = 1e-8  # added to sqrt(second moment)
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this (torch's clip_grad_norm_); None: off
    warmup_steps: int = 0  # the learning rate rises linearly from 0 over these steps
    max_steps: int = 1000  # cosine decay from the peak to 0 at this step (HF get_cosine_schedule_with_warmup)
    seed: int = 0  # the dropout masks' seed (`weights.shared.dropout`); the step is the optimizer's count

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"TrainingHParams.{field}: {why}, got {getattr(self, field)!r}")

        if not self.learning_rate >= 0:
            raise bad("learning_rate", "must be >= 0")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "must be in [0, 1)")
        if not self.adam_epsilon > 0:
            raise bad("adam_epsilon", "must be > 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise bad("max_grad_norm", "must be > 0 (None turns clipping off)")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise bad("warmup_steps", "must be an integer >= 0")
        if not isinstance(self.max_steps, int) or self.max_steps < max(1, self.warmup_steps):
            raise bad("max_steps", f"must be an integer >= max(1, warmup_steps={self.warmup_steps})")


def lr_factor(hparams: TrainingHParams, step: int) -> float:
    """The schedule's multiplier of the peak learning rate at optimizer step `step` (0 for the
    first update): `step / warmup` during the warmup, then `(1 + cos(pi * progress)) / 2`, progress
    going from 0 at the end of the warmup to 1 at `max_steps` (and staying there; HF's
    `get_cosine_schedule_with_warmup` rises again past it). The torch twin's `LambdaLR` calls this."""
    warmup = hparams.warmup_steps
    if step < warmup:
        return step / warmup
    progress = min(step - warmup, hparams.max_steps - warmup) / max(1, hparams.max_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate_at(hparams: TrainingHParams, step: int) -> float:
    """The learning rate of optimizer step `step`: the peak times `lr_factor` (torch's `LambdaLR`
    computes exactly this product)."""
    return hparams.learning_rate * lr_factor(hparams, step)


def decays(name: str) -> bool:
    """Whether weight decay applies to the parameter with HF name `name`: every weight matrix and
    the embedding table, not biases and not norm gains (HF Trainer's rule)."""
    *_, module, leaf = name.split(".") if "." in name else ("", name)
    return leaf != "bias" and not module.endswith("norm")
