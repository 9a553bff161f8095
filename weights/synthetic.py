"""Synthetic HF-layout checkpoints: seeded random tensors with the shapes a config implies.

For tests and benchmarks that need a checkpoint without downloading one. Tensors are generated
and written one at a time, so a billion-parameter checkpoint costs one tensor of memory.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import ShardedWriter
from .config import ModelConfig
from .dtypes import FLOAT_DTYPES, dtype_name
from .safetensors_io import TensorSpec

__all__ = ["HEADS", "hf_shapes", "synthetic_tensor", "write_synthetic_checkpoint"]

# Head name -> its HF class name and its extra tensors beyond the decoder.
HEADS = {"causal_lm": "LlamaForCausalLM", "sequence_classification": "LlamaForSequenceClassification",
         "question_answering": "LlamaForQuestionAnswering"}


def hf_shapes(config: ModelConfig, head: str = "causal_lm", *,
              tied_head_saved: bool = False) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a LLaMA-family model of `config` with `head`, in model order.

    A tied `lm_head.weight` is left out, as transformers saves it, unless `tied_head_saved`.
    """
    e, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, k, d = config.num_attention_heads, config.resolved_num_key_value_heads, config.resolved_head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, e)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        for proj, (out, inp) in (("q", (h * d, e)), ("k", (k * d, e)), ("v", (k * d, e)), ("o", (e, h * d))):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (out, inp)
            if config.attention_bias:
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (out,)
        for proj, (out, inp) in (("gate", (i, e)), ("up", (i, e)), ("down", (e, i))):
            shapes[f"{p}mlp.{proj}_proj.weight"] = (out, inp)
            if config.mlp_bias:
                shapes[f"{p}mlp.{proj}_proj.bias"] = (out,)
        shapes[f"{p}input_layernorm.weight"] = (e,)
        shapes[f"{p}post_attention_layernorm.weight"] = (e,)
    shapes["model.norm.weight"] = (e,)
    if head == "causal_lm":
        if not config.tie_word_embeddings or tied_head_saved:
            shapes["lm_head.weight"] = (v, e)
    elif head == "sequence_classification":
        shapes["score.weight"] = (config.num_labels, e)
    elif head == "question_answering":
        shapes["qa_outputs.weight"] = (2, e)
        shapes["qa_outputs.bias"] = (2,)
    else:
        raise ValueError(f"unknown head {head!r}; one of {', '.join(HEADS)}")
    return shapes


def synthetic_tensor(name: str, shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    """A seeded normal(0, 0.02) tensor; the same (name, shape, dtype, seed) gives the same bits."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(dtype)


def write_synthetic_checkpoint(directory: str | os.PathLike, config: ModelConfig, *,
                               head: str = "causal_lm", dtype: Any = np.float32, seed: int = 0,
                               max_shard_size: int | str | None = "5GB", force: bool = False,
                               tied_head_saved: bool = False, fsync: bool = True) -> Path:
    """Write `config.json` and seeded weights in HF layout (sharded past `max_shard_size`).

    With `tied_head_saved`, a tied head is written as a copy of the embedding.
    """
    dt = np.dtype(dtype)
    shapes = hf_shapes(config, head, tied_head_saved=tied_head_saved)
    config = config.replace(architectures=(HEADS[head],), torch_dtype=_torch_name(dt))
    specs = [TensorSpec(name, shape, dt) for name, shape in shapes.items()]
    with ShardedWriter(directory, specs, max_shard_size=max_shard_size, force=force, fsync=fsync) as w:
        config.save_pretrained(w.staging)
        for name in w.order:
            src = "model.embed_tokens.weight" if name == "lm_head.weight" and config.tie_word_embeddings else name
            w.write(name, synthetic_tensor(src, shapes[name], dt, seed))
    return Path(directory)


def _torch_name(dt: np.dtype) -> str:
    """The config.json `torch_dtype` of `dt` (its numpy name when it is not a float of the table)."""
    return dtype_name(dt) if dt in FLOAT_DTYPES.values() else dt.name
