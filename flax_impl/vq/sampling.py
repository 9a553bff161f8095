"""Sampling: block length 1 with the carried state, temperature and nucleus (top-p) sampling.

The draw is the project's generation sampler (`weights.shared.generation`): `sampling_weights`
filters, `sample_from_weights` picks by inverse CDF with the numpy noise of the seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights.shared.generation import sampling_noise
from ..generation import greedy, sample_from_weights, sampling_weights
from .model import Transformer

__all__ = ["draw", "sample"]


def draw(logprobs: jax.Array, noise: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """logprobs [B, V], noise [B] uniform in [0, 1) -> tokens [B]; temperature 0 is greedy.
    top_p keeps the most probable tokens until their mass reaches p (at least one)."""
    if temperature == 0.0:
        return greedy(logprobs, None)
    return sample_from_weights(sampling_weights(logprobs, temperature, None, top_p, None), noise)


@nnx.jit
def _step(model: Transformer, token: jax.Array, state: list):
    out = model(token[:, None], state, None, block_len=1, is_train=False)
    return out["attn_state"], out["logprobs"][:, -1]


def sample(model: Transformer, batch_size: int, length: int, *, seed: int, temperature: float = 1.0,
           top_p: float | None = None, start_token: int = 1) -> dict:
    """Draw `length` tokens per row, one recurrent step (block length 1) at a time, starting
    from `start_token` (the reference starts from eos = 1). top_p defaults to config.p_nucleus.
    Returns {tokens [B, length] numpy int64, logprobs [B, length, V] of each step}."""
    c = model.config
    top_p = c.p_nucleus if top_p is None else top_p
    noise = jnp.asarray(sampling_noise(seed, length, batch_size))
    state = Transformer.initial_state(c, batch_size)
    token = jnp.full((batch_size,), start_token, dtype=jnp.int32)
    tokens, logprobs = [], []
    for step in range(length):
        state, step_logprobs = _step(model, token, state)  # compiled once, reused every step
        token = draw(step_logprobs, noise[step], temperature, top_p)
        tokens.append(token)
        logprobs.append(step_logprobs)
    return dict(tokens=np.asarray(jnp.stack(tokens, axis=1)).astype(np.int64),
                logprobs=jnp.stack(logprobs, axis=1))
