"""Runners for the `generate()` tests: both twins' generate on the same numpy prompts, and the
cache-free forward pass that cached decoding must equal."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_impl.generation import generate as flax_generate
from parity.loading import twins_from_config
from torch_impl.generation import generate as torch_generate
from weights.config import ModelConfig
from weights.shared.generation import position_ids_from_mask

__all__ = ["run_both", "twin_pair", "uncached_logits"]


def twin_pair(config: ModelConfig, dtype: str = "float64", seed: int = 0):
    """(torch, Flax) `ForCausalLM` with the same weights (`parity.loading.twins_from_config`: the
    Flax model is built abstractly and filled with the torch weights, no Flax random init)."""
    return twins_from_config(config, "causal_lm", dtype, seed).pair


def run_both(pair, ids: np.ndarray, mask: np.ndarray, **kw):
    """`generate` in each twin on the same numpy prompts; outputs as numpy (sequences or fields)."""
    t_model, f_model = pair
    t_out = torch_generate(t_model, torch.from_numpy(ids), torch.from_numpy(mask), **kw)
    f_out = flax_generate(f_model, jnp.asarray(ids), jnp.asarray(mask), **kw)
    if not kw.get("return_scores"):
        return t_out.numpy(), np.asarray(f_out)
    fields = ("sequences", "token_logprobs", "top_tokens", "top_probs")
    as_np = lambda o: {k: np.asarray(getattr(o, k).detach().numpy() if hasattr(getattr(o, k), "detach") else getattr(o, k))
                       for k in fields}
    return as_np(t_out), as_np(f_out)


_flax_logits = nnx.jit(lambda m, i, a, p: m(i, a, p).logits)


def uncached_logits(model, sequences: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits `[B, P + N, V]` of one cache-free forward pass over the generated sequences
    (generated tokens count as real). The model is causal, so the logits at column P - 1 + t are
    exactly what recomputing the whole forward pass at step t gives (see the literal loop in
    `test_cached_equals_step_by_step_recomputation_torch`)."""
    full = np.concatenate([mask, np.ones((mask.shape[0], sequences.shape[1] - mask.shape[1]), np.int64)], 1)
    pos = position_ids_from_mask(full)
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(torch.from_numpy(sequences), torch.from_numpy(full), torch.from_numpy(pos)).logits.double().numpy()
    return np.asarray(_flax_logits(model, jnp.asarray(sequences), jnp.asarray(full), jnp.asarray(pos)), np.float64)
