"""Building the two twins of one model with the same weights.

The torch twin is initialised (HF's init, seeded) and its weights are copied into the Flax twin
through the `weights/` name and layout rules, exactly the path a checkpoint takes.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import torch
from flax import nnx

import flax_impl
import torch_impl
from flax_impl.checkpoint import load_numpy_state
from torch_impl.checkpoint import state_to_numpy
from weights.config import ModelConfig

DTYPES = ("float64", "float32", "bfloat16", "float16")
HEADS = {
    "causal_lm": "ForCausalLM",
    "sequence_classification": "ForSequenceClassification",
    "question_answering": "ForQuestionAnswering",
}


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype for a dtype name of `DTYPES`."""
    return {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def jax_dtype(name: str) -> Any:
    """jax dtype for a dtype name of `DTYPES`."""
    return {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16,
            "float16": jnp.float16}[name]


def copy_weights(source: torch.nn.Module, target: nnx.Module) -> None:
    """torch module -> Flax module of the same class, through the HF name/layout rules."""
    load_numpy_state(target, state_to_numpy(source))


def build_pair(config: ModelConfig, head: str = "causal_lm", dtype: str = "float64",
               seed: int = 0) -> tuple[torch.nn.Module, nnx.Module]:
    """(torch model, Flax model) of one head class with identical weights, in `dtype`.

    `head` is a key of `HEADS` or a class name (`ForCausalLM`, ..., `DecoderModel`).
    """
    cls = HEADS.get(head, head)
    torch.manual_seed(seed)
    t_model = getattr(torch_impl, cls)(config, dtype=torch_dtype(dtype))
    f_model = getattr(flax_impl, cls)(config, dtype=jax_dtype(dtype), rngs=nnx.Rngs(seed))
    copy_weights(t_model, f_model)
    return t_model, f_model
