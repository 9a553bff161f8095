"""Builders and runners for tests that run one module, or one whole model, in both twins on the
same numpy inputs, and compare against the tolerance table."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import flax_impl
import torch_impl
from parity.compare import Comparison, compare, to_numpy
from parity.loading import copy_weights, jax_dtype, torch_dtype, twins_from_config
from parity.tolerances import tolerance
from weights.config import ModelConfig


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Give every parameter (norm gains and biases included) random values, so that no term
    of the computation hides behind an init of ones or zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
            p.copy_((noise + (1.0 if p.dim() == 1 and torch.all(p == 1) else 0.0)).to(p.dtype))


def layer_pair(name: str, *args: Any, dtype: str, seed: int = 0) -> tuple[torch.nn.Module, nnx.Module]:
    """One layer class built in both twins from the same constructor args, weights shared."""
    # A norm has no activation dtype of its own (its output follows its input): only `param_dtype`.
    key = "param_dtype" if name == "RMSNorm" else "dtype"
    t_mod = getattr(torch_impl, name)(*args, **{key: torch_dtype(dtype)})
    f_mod = getattr(flax_impl, name)(*args, **{key: jax_dtype(dtype)}, rngs=nnx.Rngs(seed))
    randomize(t_mod, seed)
    if name == "RMSNorm":
        # A bare norm's only tensor is named "weight", with no module name for the table to
        # classify; copy it directly (inside a model it is "<...>norm.weight").
        f_mod.weight[...] = to_jax(t_mod.weight.detach().double().numpy(), dtype)
    else:
        copy_weights(t_mod, f_mod)
    return t_mod, f_mod


_JITTED: dict[tuple, Any] = {}


def fcall(module: nnx.Module, *args: Any, **static: Any) -> Any:
    """Call a Flax module compiled. Hypothesis draws a fresh shape nearly every example, and one
    jit compile of the whole call is ~3x cheaper than eager mode's compile of every primitive;
    repeated shapes (decode steps) hit the cache of the one jitted function per static kwargs."""
    key = tuple(sorted(static.items()))
    if key not in _JITTED:
        _JITTED[key] = nnx.jit(lambda m, *a: m(*a, **static))
    return _JITTED[key](module, *args)


def to_torch(x: Any, dtype: str) -> Any:
    """numpy inputs -> torch: floats cast to `dtype`, ints and bools kept."""
    if isinstance(x, tuple):
        return tuple(to_torch(v, dtype) for v in x)
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(torch_dtype(dtype)) if x.dtype.kind == "f" else t
    return x


def to_jax(x: Any, dtype: str) -> Any:
    """numpy inputs -> jax: floats cast to `dtype` (same rounding as torch), ints and bools kept."""
    if isinstance(x, tuple):
        return tuple(to_jax(v, dtype) for v in x)
    if isinstance(x, np.ndarray):
        a = jnp.asarray(x)
        return a.astype(jax_dtype(dtype)) if x.dtype.kind == "f" else a
    return x


def assert_close(name: str, reference: Any, got: Any, dtype: str, quantity: str = "activations") -> Comparison:
    """Compare against the tolerance table; the failure message carries the figures."""
    c = compare(name, reference, got, tolerance(dtype, quantity))
    assert c.passed, (f"{name} ({dtype}): max abs {c.max_abs:.3e}, rel {c.rel:.3e} at {c.worst_index} "
                      f"> tol {c.tolerance:.0e}")
    return c


# ---- whole models: both twins of one config, run on numpy inputs ------------------------------
def randomized_pair(config: ModelConfig, head: str = "causal_lm", dtype: str = "float64", seed: int = 0):
    """Both twins with identical weights; norm gains and biases randomised too, so a twin that
    ignored one (or Gemma's `1 + w`) could not pass."""
    t_model, f_model = twins_from_config(config, head, dtype, seed).pair
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in t_model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("norm.weight") and not config.norm_unit_offset else 0.0
                p.copy_((base + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))
    copy_weights(t_model, f_model)
    return t_model, f_model


def batch(config: ModelConfig, b: int = 2, t: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
    """ids, mask (row 0 left-padded by 2, row 1 full), causal labels, QA spans, class labels."""
    rng = np.random.default_rng(seed)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    mask = np.ones((b, t), np.int64)
    mask[0, :2] = 0
    ids = np.where(mask == 1, rng.choice([v for v in range(config.vocab_size) if v != pad], (b, t)), pad)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100),
            "class_labels": rng.integers(0, config.num_labels, (b,)),
            "start_positions": rng.integers(0, t, (b,)), "end_positions": rng.integers(0, t, (b,))}


def run_torch(model, inputs: dict[str, np.ndarray], **kw):
    """Call a torch model on numpy inputs (converted as they are: ints stay ints)."""
    return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **kw)


def run_flax(model, inputs: dict[str, np.ndarray], **kw):
    """Call a Flax model, eagerly, on numpy inputs (converted as they are)."""
    return model(**{k: jnp.asarray(v) for k, v in inputs.items()}, **kw)


def decode_matches_full_pass(config: ModelConfig, dtype: str = "float64", prompt: int = 1, t: int = 9) -> None:
    """Prefill `prompt` tokens, then decode one token at a time (teacher-forced) in each twin:
    every step's logits equal the full pass's, and the twins' cached logits agree. (A one-token
    prompt keeps every step the same shape: the eager Flax twin compiles each operation once.)"""
    t_model, f_model = randomized_pair(config, "causal_lm", dtype)
    x = batch(config, t=t)
    ids, mask = x["input_ids"], x["attention_mask"]
    t_full = run_torch(t_model, {"input_ids": ids, "attention_mask": mask}).logits
    f_full = run_flax(f_model, {"input_ids": ids, "attention_mask": mask}).logits
    t_cache = torch_impl.KVCache.init(config, ids.shape[0], t, dtype=torch_dtype(dtype))
    f_cache = flax_impl.KVCache.init(config, ids.shape[0], t, dtype=jax_dtype(dtype))
    steps = [(0, prompt)] + [(i, i + 1) for i in range(prompt, t)]
    for start, end in steps:
        # The [B, S] mask convention (S = cache capacity): one mask shape for every step.
        step = {"input_ids": ids[:, start:end], "attention_mask": mask}
        t_out = run_torch(t_model, step, past_key_values=t_cache, use_cache=True)
        f_out = run_flax(f_model, step, past_key_values=f_cache, use_cache=True)
        t_cache, f_cache = t_out.past_key_values, f_out.past_key_values
        # A fully padded query row (row 0's first slots) is undefined in HF; skip it.
        real = mask[:, start:end].astype(bool)
        for label, got, full in (("torch", t_out.logits, t_full), ("flax", f_out.logits, f_full)):
            assert_close(f"{label} cached logits [{start}:{end}]", to_numpy(full)[:, start:end][real],
                  to_numpy(got)[real], dtype, "logits")
        assert_close(f"torch vs flax cached [{start}:{end}]", t_out.logits, f_out.logits, dtype, "logits")


__all__ = ["assert_close", "batch", "decode_matches_full_pass", "fcall", "layer_pair", "randomize", "randomized_pair",
           "run_flax", "run_torch", "to_jax", "to_numpy", "to_torch"]


def spy_on_packs(monkeypatch: Any, linear_module: Any) -> list[bool]:
    """Whether each call of `linear_module.Linear.packed_for` (either twin's `layers.linear`) found
    a packed weight, in call order (a traced program calls it once per linear, when traced)."""
    calls = []
    real = linear_module.Linear.packed_for

    def spy(self, x):
        packed = real(self, x)
        calls.append(packed is not None)
        return packed

    monkeypatch.setattr(linear_module.Linear, "packed_for", spy)
    return calls
