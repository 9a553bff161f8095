"""Sampling: block length 1 with the carried state, temperature and nucleus (top-p) sampling.

Local stand-in for the project's generation sampler (issue 6, not in the tree yet), by the same
method so it can be merged later: the uniform noise is drawn with numpy from the seed, one number
per row and step, and the token is the inverse CDF of the distribution after temperature and
nucleus filtering, over tokens sorted by descending probability (ties: lower index first). Both
twins therefore draw identical tokens for a seed whenever their probabilities agree to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import Transformer

__all__ = ["draw", "sample"]


def draw(logprobs: jax.Array, noise: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """logprobs [B, V], noise [B] uniform in [0, 1) -> tokens [B] (int32).

    temperature 0 is greedy. The nucleus keeps the smallest prefix of the sorted tokens whose
    probability reaches top_p, always at least the most probable token."""
    if temperature == 0.0:
        return jnp.argmax(logprobs, axis=-1)
    probs = jax.nn.softmax(logprobs / temperature, axis=-1)
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    cum = jnp.cumsum(sorted_probs, axis=-1)
    keep = (cum - sorted_probs) < top_p
    kept = sorted_probs * keep.astype(sorted_probs.dtype)
    kept_cum = jnp.cumsum(kept, axis=-1)
    target = noise.astype(kept.dtype)[:, None] * kept_cum[:, -1:]
    idx = jnp.sum((kept_cum <= target).astype(jnp.int32), axis=-1, keepdims=True)
    idx = jnp.minimum(idx, jnp.sum(keep.astype(jnp.int32), axis=-1, keepdims=True) - 1)
    return jnp.take_along_axis(order, idx, axis=-1)[:, 0]


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
    rng = np.random.default_rng(seed)
    state = Transformer.initial_state(c, batch_size)
    token = jnp.full((batch_size,), start_token, dtype=jnp.int32)
    tokens, logprobs = [], []
    for _ in range(length):
        state, step_logprobs = _step(model, token, state)  # compiled once, reused every step
        token = draw(step_logprobs, jnp.asarray(rng.random(batch_size)), temperature, top_p)
        tokens.append(token)
        logprobs.append(step_logprobs)
    return dict(tokens=np.asarray(jnp.stack(tokens, axis=1)).astype(np.int64),
                logprobs=jnp.stack(logprobs, axis=1))
