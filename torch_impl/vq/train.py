"""Training: the composite loss, the two optimizer groups and a truncated-BPTT train step.

The codebook is trained only by its surrogate loss under SGD at learning rate 1 (one EMA k-means
step per update: `docs/transformer_vq.md`, Training); every other parameter goes to the main
optimizer (Adam here; the reference's adamw / lion / adafactor chains can replace it).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .attention import tree_detach
from .model import Transformer
from .quantizer import VQSpec

__all__ = ["loss_fn", "is_codebook_param", "make_optimizer", "train_step"]


def loss_fn(model: Transformer, batch: Mapping[str, torch.Tensor], state: list, vq_spec: VQSpec, *,
            block_len: int | None = None, rng: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Composite loss l_lm + c_beta * l_commit + l_codebook, and the model outputs with metrics.

    batch: `inputs` [B,P], `targets` [B,P], `loss_mask` [B,P]. l_lm is the mean over all B*P
    positions of mask * nll: the denominator is B*P, not the mask's sum, as in the reference."""
    out = model(batch["inputs"], state, vq_spec, block_len=block_len, is_train=True, rng=rng)
    logprobs = out["logprobs"]
    nll = -torch.take_along_dim(logprobs, batch["targets"].long()[..., None], dim=-1)[..., 0]
    mask = batch["loss_mask"].to(nll.dtype)
    l_lm_unscaled = torch.mean(mask * nll)
    composite = l_lm_unscaled + model.config.c_beta * out["l_commit"] + out["l_codebook"]
    out["l_lm_unscaled"] = l_lm_unscaled
    out["metrics"] = dict(out["metrics"], loss_lm_per_token_unscaled=l_lm_unscaled.detach(),
                          loss_mask_per_token=torch.mean(mask), loss_commit_per_token=out["l_commit"].detach())
    return composite, out


def is_codebook_param(name: str) -> bool:
    """The reference sends every parameter whose name starts with `c_` to the codebook group."""
    return name.rsplit(".", 1)[-1].startswith("c_")


class _TwoGroups:
    """The main optimizer and SGD(lr=1) on the codebook, stepped together."""

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def make_optimizer(model: Transformer, learning_rate: float, *, b1: float = 0.9, b2: float = 0.98,
                   eps: float = 1e-9) -> _TwoGroups:
    """Adam(learning_rate) on the main parameters, SGD(lr=1) on the codebook, nothing else."""
    main = [p for n, p in model.named_parameters() if not is_codebook_param(n)]
    codebook = [p for n, p in model.named_parameters() if is_codebook_param(n)]
    return _TwoGroups([torch.optim.Adam(main, lr=learning_rate, betas=(b1, b2), eps=eps, foreach=False),
                       torch.optim.SGD(codebook, lr=1.0)])


def train_step(model: Transformer, optimizer: _TwoGroups, batch: Mapping[str, torch.Tensor], *,
               n_device: int = 1, block_len: int | None = None, rng: torch.Generator | None = None) -> dict:
    """One sequence of truncated BPTT: cut [B, T] into T / update_len chunks, one optimizer update
    per chunk, the state carried between chunks under stop-gradient. Returns metrics averaged
    over the updates. `n_device`: replicas whose gradients the caller averages (scales the EMA)."""
    c = model.config
    block_len = c.block_len if block_len is None else block_len
    bsz, seq_len = batch["inputs"].shape[:2]
    c.check_block_len(seq_len, c.update_len)
    c.check_block_len(c.update_len, block_len)
    state = Transformer.initial_state(c, bsz)
    history = []
    for start in range(0, seq_len, c.update_len):
        chunk = {k: v[:, start:start + c.update_len] for k, v in batch.items()}
        spec = VQSpec(torch.tensor([n_device]), torch.tensor([c.update_len // block_len]), chunk["loss_mask"])
        optimizer.zero_grad()
        loss, out = loss_fn(model, chunk, state, spec, block_len=block_len, rng=rng)
        loss.backward()
        optimizer.step()
        state = tree_detach(out["attn_state"])
        history.append(dict(out["metrics"], loss=loss.detach()))
    return {k: torch.mean(torch.stack([h[k] for h in history])) for k in history[0]}
