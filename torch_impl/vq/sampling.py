"""Sampling: block length 1 with the carried state, temperature and nucleus (top-p) sampling.

Local stand-in for the project's generation sampler (issue 6, not in the tree yet), by the same
method so it can be merged later: the uniform noise is drawn with numpy from the seed, one number
per row and step, and the token is the inverse CDF of the distribution after temperature and
nucleus filtering, over tokens sorted by descending probability (ties: lower index first). Both
twins therefore draw identical tokens for a seed whenever their probabilities agree to rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from .model import Transformer

__all__ = ["draw", "sample"]


def draw(logprobs: torch.Tensor, noise: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logprobs [B, V], noise [B] uniform in [0, 1) -> tokens [B] (int64).

    temperature 0 is greedy. The nucleus keeps the smallest prefix of the sorted tokens whose
    probability reaches top_p, always at least the most probable token."""
    if temperature == 0.0:
        return torch.argmax(logprobs, dim=-1)
    probs = torch.softmax(logprobs / temperature, dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    sorted_probs = torch.take_along_dim(probs, order, dim=-1)
    cum = torch.cumsum(sorted_probs, dim=-1)
    keep = (cum - sorted_probs) < top_p
    kept = sorted_probs * keep.to(sorted_probs.dtype)
    kept_cum = torch.cumsum(kept, dim=-1)
    target = noise.to(kept.dtype)[:, None] * kept_cum[:, -1:]
    idx = torch.sum((kept_cum <= target).to(torch.int64), dim=-1, keepdim=True)
    idx = torch.minimum(idx, torch.sum(keep.to(torch.int64), dim=-1, keepdim=True) - 1)
    return torch.take_along_dim(order, idx, dim=-1)[:, 0]


@torch.no_grad()
def sample(model: Transformer, batch_size: int, length: int, *, seed: int, temperature: float = 1.0,
           top_p: float | None = None, start_token: int = 1) -> dict:
    """Draw `length` tokens per row, one recurrent step (block length 1) at a time, starting
    from `start_token` (the reference starts from eos = 1). top_p defaults to config.p_nucleus.
    Returns {tokens [B, length] numpy int64, logprobs [B, length, V] of each step}."""
    c = model.config
    top_p = c.p_nucleus if top_p is None else top_p
    rng = np.random.default_rng(seed)
    state = Transformer.initial_state(c, batch_size)
    token = torch.full((batch_size,), start_token, dtype=torch.int64)
    tokens, logprobs = [], []
    for _ in range(length):
        out = model(token[:, None], state, None, block_len=1, is_train=False)
        state = out["attn_state"]
        step_logprobs = out["logprobs"][:, -1]
        token = draw(step_logprobs, torch.from_numpy(rng.random(batch_size)), temperature, top_p)
        tokens.append(token)
        logprobs.append(step_logprobs)
    return dict(tokens=torch.stack(tokens, dim=1).numpy(), logprobs=torch.stack(logprobs, dim=1))
