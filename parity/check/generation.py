"""The generation rows of a parity check: greedy tokens of both twins' `generate()`.

Tokens must be identical. The one tolerated difference is a near-tie: if the twins part ways
at a step where the reference's two best candidates are closer than the logit tolerance
allows the twins to differ, either choice is right, and the row passes with a note (after
that step the continuations are no longer comparable).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..compare import Comparison, to_numpy
from ..inputs import Batch
from ..report import Row

__all__ = ["generation_rows", "left_aligned"]


def left_aligned(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask)` with each row's real tokens moved to the right end, the
    prompt layout `generate()` expects (right-padded rows become left-padded)."""
    ids = np.empty_like(batch.input_ids)
    mask = np.zeros_like(batch.attention_mask)
    for r, (row, keep) in enumerate(zip(batch.input_ids, batch.attention_mask)):
        real = row[keep == 1]
        pad = row[keep == 0]
        ids[r] = np.concatenate([pad, real])
        mask[r, row.shape[0] - real.shape[0]:] = 1
    return ids, mask


def _unavailable(reason: str) -> list[Row]:
    na = Comparison("greedy tokens", float("nan"), float("nan"), (), 0.0, False)
    return [Row("generation", "tokens", na, note=reason, status="n/a")]


def generation_rows(torch_model: Any, flax_model: Any, batch: Batch, head: str, config: Any,
                    logit_tol: float, max_new_tokens: int, logit_scale: float = 1.0) -> list[Row]:
    """Greedy generation from the batch's prompts in both twins, compared token for token."""
    if head != "causal_lm":
        return []
    if max_new_tokens <= 0:
        return _unavailable("max_new_tokens is 0")
    try:
        from flax_impl.generation import generate as flax_generate
        from torch_impl.generation import generate as torch_generate
    except ImportError as e:
        return _unavailable(f"generate() not available in this build ({e.name})")
    import jax.numpy as jnp
    import torch

    ids, mask = left_aligned(batch)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=pad, return_scores=True)
    dev = next(torch_model.parameters()).device
    t_out = torch_generate(torch_model, torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev), **kw)
    f_out = flax_generate(flax_model, jnp.asarray(ids), jnp.asarray(mask), **kw)
    t_seq = to_numpy(t_out.sequences)[:, ids.shape[1]:]
    f_seq = np.asarray(f_out.sequences)[:, ids.shape[1]:]
    shape = tuple(t_seq.shape)
    if t_seq.shape != f_seq.shape:
        c = Comparison("greedy tokens", 1.0, 1.0, (), 0.0, False, shape)
        return [Row("generation", "tokens", c, note=f"lengths differ: {t_seq.shape[1]} vs {f_seq.shape[1]}")]
    differ = t_seq != f_seq
    n_tokens = int(t_seq.size)
    if not differ.any():
        c = Comparison("greedy tokens", 0.0, 0.0, (), 0.0, True, shape)
        return [Row("generation", "tokens", c, note=f"{n_tokens} new tokens identical")]
    # Each diverging row: is its first mismatch a near-tie in the reference's scores?
    top = to_numpy(t_out.top_probs)
    ties, real = [], []
    for r in np.flatnonzero(differ.any(axis=1)):
        step = int(np.argmax(differ[r]))
        p1, p2 = top[r, step, 0], top[r, step, 1] if top.shape[-1] > 1 else 0.0
        margin = math.log(p1) - math.log(p2) if p1 > 0 and p2 > 0 else math.inf
        (ties if margin <= 2 * logit_tol * logit_scale else real).append((int(r), step, margin))
    first = min(ties + real, key=lambda x: (x[1], x[0]))
    passed = not real
    mismatched = int(differ.sum())
    # Figures of a token row: the fraction of new tokens that differ, in both columns (a count is
    # not an error magnitude); worst_index is (row, step) of the first divergence.
    c = Comparison("greedy tokens", mismatched / n_tokens, mismatched / n_tokens, (first[0], first[1]), 0.0,
                   passed, shape)
    what = "; ".join(f"row {r} step {s} (top-2 logit margin {m:.1e})" for r, s, m in sorted(ties + real))
    note = f"{mismatched} of {n_tokens} new tokens differ; " + ("near-tie only: " if passed else "diverged: ") + what
    return [Row("generation", "tokens", c, note=note)]
