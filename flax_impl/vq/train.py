"""Training: the composite loss, the two optimizer groups and a truncated-BPTT train step.

The codebook is trained only by its surrogate loss under SGD at learning rate 1 (one EMA k-means
step per update: `docs/transformer_vq.md`, Training); every other parameter goes to the main
optimizer (Adam here; the reference's adamw / lion / adafactor chains can replace it).
"""

from __future__ import annotations

from functools import partial
from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from weights.names import tree_path_names

from .attention import tree_detach
from .model import Transformer
from .quantizer import VQSpec

__all__ = ["loss_fn", "is_codebook_param", "make_optimizer", "train_step"]


def loss_fn(model: Transformer, batch: Mapping[str, jax.Array], state: list, vq_spec: VQSpec, *,
            block_len: int | None = None, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Composite loss l_lm + c_beta * l_commit + l_codebook, and the model outputs with metrics.

    batch: `inputs` [B,P], `targets` [B,P], `loss_mask` [B,P]. l_lm is the mean over all B*P
    positions of mask * nll: the denominator is B*P, not the mask's sum, as in the reference."""
    out = model(batch["inputs"], state, vq_spec, block_len=block_len, is_train=True, rng=rng)
    logprobs = out["logprobs"]
    nll = -jnp.take_along_axis(logprobs, batch["targets"].astype(jnp.int32)[..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(nll.dtype)
    l_lm_unscaled = jnp.mean(mask * nll)
    composite = l_lm_unscaled + model.config.c_beta * out["l_commit"] + out["l_codebook"]
    out["l_lm_unscaled"] = l_lm_unscaled
    out["metrics"] = dict(out["metrics"], loss_lm_per_token_unscaled=jax.lax.stop_gradient(l_lm_unscaled),
                          loss_mask_per_token=jnp.mean(mask),
                          loss_commit_per_token=jax.lax.stop_gradient(out["l_commit"]))
    return composite, out


def is_codebook_param(name: str) -> bool:
    """The reference sends every parameter whose name starts with `c_` to the codebook group."""
    return name.rsplit(".", 1)[-1].startswith("c_")


def _labels(params):
    # Leaves may be Param variables (at init) or arrays (at update): the module path's names decide.
    def label(path, _):
        return "codebook" if any(is_codebook_param(str(n)) for n in tree_path_names(path)) else "main"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(model: Transformer, learning_rate: float, *, b1: float = 0.9, b2: float = 0.98,
                   eps: float = 1e-9) -> nnx.Optimizer:
    """Adam(learning_rate) on the main parameters, SGD(lr=1) on the codebook, nothing else."""
    tx = optax.multi_transform({"main": optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
                                "codebook": optax.sgd(1.0)}, _labels)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@partial(nnx.jit, static_argnames=("block_len",))
def _update(model, optimizer, chunk, state, spec, block_len, rng):
    def loss(m):
        return loss_fn(m, chunk, state, spec, block_len=block_len, rng=rng)

    (value, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    optimizer.update(model, grads)
    return value, tree_detach(out["attn_state"]), out["metrics"]


def train_step(model: Transformer, optimizer: nnx.Optimizer, batch: Mapping[str, jax.Array], *,
               n_device: int = 1, block_len: int | None = None, rng: jax.Array | None = None) -> dict:
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
        spec = VQSpec(jnp.array([n_device]), jnp.array([c.update_len // block_len]), chunk["loss_mask"])
        chunk_rng = None if rng is None else jax.random.fold_in(rng, start)
        loss, state, metrics = _update(model, optimizer, chunk, state, spec, block_len, chunk_rng)
        history.append(dict(metrics, loss=loss))
    return {k: jnp.mean(jnp.stack([h[k] for h in history])) for k in history[0]}
