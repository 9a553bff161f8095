"""The rows both checks build (`pair`, whole model; `streamed`, layer by layer), so that the two
report the same tensors under the same names, with the same figures."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ..compare import compare, to_numpy
from ..inputs import Batch
from ..report import Row
from ..tolerances import tolerance

__all__ = ["capped_logit_scale", "describe_batch", "head_rows", "kv_cache_rows", "layer_of", "to_jax", "to_torch",
           "tolerance_for"]


def to_torch(a: np.ndarray | None, device: torch.device | str | None = None) -> torch.Tensor | None:
    """numpy -> torch on `device` (default: the CPU), bits and dtype unchanged."""
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device or "cpu")


def to_jax(a: np.ndarray | None) -> jax.Array | None:
    """numpy -> jax, bits and dtype unchanged (int64/float64 need `jax_enable_x64`)."""
    return None if a is None else jnp.asarray(a)


def tolerance_for(dtype: str, quantity: str, overrides: Mapping[str, float] | None) -> float:
    # An override replaces the number, not the formula: the dtype's scale floor stays.
    return tolerance(dtype, quantity, (overrides or {}).get(quantity))


def capped_logit_scale(torch_model: Any, t_out: Any, head: str) -> tuple[float, str] | None:
    """For soft-capped logits (`final_logit_softcapping`, Gemma 2): the scale of the logits
    before the cap, and a note saying so; None otherwise.

    `cap * tanh(x / cap)` shrinks values to below `cap` but passes small errors through at
    slope 1 (it is a contraction, never an amplifier): the twins' logit error is the error of
    the logits that went in, so it is measured relative to their scale, not to the capped one.
    """
    cap = getattr(torch_model.config, "final_logit_softcapping", None)
    if head != "causal_lm" or cap is None:
        return None
    # ForCausalLM.logits without its cap, on the reference's own final hidden state.
    weight = torch_model.lm_head.weight if torch_model.lm_head is not None else torch_model.model.embed_tokens.weight
    raw = torch.nn.functional.linear(t_out.hidden_states[-1].detach().double(), weight.detach().double())
    scale = float(raw.abs().max())  # compare() still applies the dtype's floor under it
    return scale, f"soft-capped at {cap:g}: relative to the pre-cap scale {scale:.3g}"


def describe_batch(batch: Batch) -> str:
    b, t = batch.input_ids.shape
    pads = ", ".join(f"{p} ({int((row == 0).sum())} pad)" for p, row in zip(batch.padding, batch.attention_mask))
    return f"batch {b} x {t} tokens; rows: {pads or 'unknown padding'}"


def head_rows(t_out: Any, f_out: Any, head: str, tol: Any, capped: tuple[float, str] | None) -> list[Row]:
    names = ("start_logits", "end_logits") if head == "question_answering" else ("logits",)
    scale, note = capped or (None, "")
    rows = [Row("head", "logits", compare(n, getattr(t_out, n), getattr(f_out, n), tol("logits"), scale), note=note)
            for n in names]
    rows.append(Row("head", "loss", compare("loss", t_out.loss, f_out.loss, tol("loss"))))
    return rows


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def kv_cache_rows(batch: Batch, head: str, t_out: Any, f_out: Any, t_cached: Any, f_cached: Any, tol: Any,
                  capped: tuple[float, str] | None) -> list[Row]:
    """The three KV-cache rows from each twin's full pass (`*_out`) and its one-token-at-a-time
    decoding (`*_cached`: logits for the causal LM, the last hidden state otherwise).

    Padding positions are left out: a padding query sees no key, so its output is an artefact
    of the mask convention (uniform weights over whatever the key axis holds), and the key
    axis of a partly filled cache legitimately holds something else than the full sequence.
    """
    t = batch.input_ids.shape[1]
    causal = head == "causal_lm"
    quantity = "logits" if causal else "activations"
    what = "logits" if causal else "last hidden state"
    real = batch.attention_mask[..., None] == 1
    only_real = lambda x: np.where(real, to_numpy(x), 0.0)
    t_full = only_real(t_out.logits if causal else t_out.hidden_states[-1])
    f_full = only_real(f_out.logits if causal else f_out.hidden_states[-1])
    t_cached, f_cached = only_real(t_cached), only_real(f_cached)
    q = tol(quantity)
    scale, cap_note = capped if causal and capped else (None, "")
    note = f"{t} one-token steps; real tokens only" + (f"; {cap_note}" if cap_note else "")
    return [Row("kv cache", quantity, compare(f"torch cached vs torch full ({what})", t_full, t_cached, q, scale),
                note=note),
            Row("kv cache", quantity, compare(f"flax cached vs flax full ({what})", f_full, f_cached, q, scale),
                note=note),
            Row("kv cache", quantity, compare(f"flax cached vs torch cached ({what})", t_cached, f_cached, q, scale),
                note=cap_note)]
