"""Transformer-VQ checkpoints: the name table, safetensors save/load and the reference importer.

Tensor names are the torch twin's `state_dict()` keys. The Flax twin uses the same attribute
names, and the layout rule is the LLaMA family's, `weights.names` (`flax_path`, `is_transposed`):
the name split at dots (list indices as ints), a linear `weight` renamed `kernel` and transposed
(`nnx.Linear` kernels are `[in, out]`).

| torch name (per sublayer `transformer_layers.{i}.scanned_attn{1,2}.`) | shape           |
|-----------------------------------------------------------------------|-----------------|
| `input_ln.g`, `input_ln.b`                                            | [E]             |
| `q_proj.weight`, `r_proj.weight`                                      | [H*d_k, E]      |
| `kvg_proj.weight` (rows: k then v then g, head-major inside each)     | [H*(d_k+2d_v), E] |
| `res_proj.weight`                                                     | [E, H*d_v]      |
| `u`, `v`                                                              | [H*d_k]         |
| `quantizer.c_sum`, `quantizer.c_count`                                | [H,C,d_k], [H,C]|

plus `token_embedder.embs` [V,E], `token_embedder.bias_out` [V], `position_embedder.scale` []
(when `pe_abs`), `out_ln.g/.b` [E] (when `e_preln`), `out_proj.weight` [V,E] and
`out_proj.bias` [V] (when untied).

`import_reference_params` maps the official Flax parameter tree (the nested dict under
`params`, e.g. restored from the reference's msgpack checkpoint with `flax.serialization`) onto
these names, so a model trained with the reference code runs in either twin.

Files go through the LLaMA family's checkpoint layer: `ShardedWriter` (staged, then renamed onto
the directory, so a crash never leaves a half-written checkpoint; other files are kept),
`CheckpointReader` (validated headers, memory-mapped tensors) and `match_state` (every missing,
unexpected or mis-shaped tensor in one `StateMismatchError`); errors are
`weights.errors.CheckpointError`s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from weights.checkpoint import CheckpointReader, ShardedWriter
from weights.errors import CheckpointError, ConfigError
from weights.pretrained import keep_on_resave
from weights.report import iter_tensors, match_state
from weights.safetensors_io import TensorSpec
from weights.vq.config import TransformerVQConfig

__all__ = [
    "VQ_WEIGHTS_NAME", "CheckpointError", "vq_param_shapes",
    "save_vq_checkpoint", "load_vq_checkpoint", "import_reference_params",
    "validate_tensors",
]

VQ_WEIGHTS_NAME = "model.safetensors"


def _sublayer_shapes(c: TransformerVQConfig) -> dict[str, tuple[int, ...]]:
    hk, hv = c.n_head * c.d_k, c.n_head * c.d_v
    return {
        "input_ln.g": (c.d_model,),
        "input_ln.b": (c.d_model,),
        "q_proj.weight": (hk, c.d_model),
        "kvg_proj.weight": (hk + 2 * hv, c.d_model),
        "r_proj.weight": (hk, c.d_model),
        "res_proj.weight": (c.d_model, hv),
        "u": (hk,),
        "v": (hk,),
        "quantizer.c_sum": (c.n_head, c.n_code, c.d_k),
        "quantizer.c_count": (c.n_head, c.n_code),
    }


def vq_param_shapes(config: TransformerVQConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model: torch name -> shape, in module order."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {}
    if not c.no_emb or c.e_tie:
        shapes["token_embedder.embs"] = (c.n_vocab, c.d_model)
        shapes["token_embedder.bias_out"] = (c.n_vocab,)
    if c.pe_abs:
        shapes["position_embedder.scale"] = ()
    for i in range(c.n_layer):
        for j in (1, 2):
            for name, shape in _sublayer_shapes(c).items():
                shapes[f"transformer_layers.{i}.scanned_attn{j}.{name}"] = shape
    if c.e_preln:
        shapes["out_ln.g"] = (c.d_model,)
        shapes["out_ln.b"] = (c.d_model,)
    if not c.e_tie:
        shapes["out_proj.weight"] = (c.n_vocab, c.d_model)
        shapes["out_proj.bias"] = (c.n_vocab,)
    return shapes


def _check(config: TransformerVQConfig, tensors: Mapping[str, np.ndarray], source: str) -> None:
    shapes = vq_param_shapes(config)
    missing = [k for k in shapes if k not in tensors]
    unexpected = [k for k in tensors if k not in shapes]
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k, shape in shapes.items():
        if tuple(tensors[k].shape) != shape:
            raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                                  f"the config needs {shape}")


def save_vq_checkpoint(directory: str | os.PathLike, config: TransformerVQConfig,
                       tensors: Mapping[str, np.ndarray]) -> Path:
    """Write `config.json` and `model.safetensors` through `ShardedWriter` (one file, staged and
    renamed into place, so never half-written); returns the weights file."""
    _check(config, tensors, "save_vq_checkpoint")
    shapes = vq_param_shapes(config)
    specs = [TensorSpec(k, shapes[k], np.asarray(tensors[k]).dtype) for k in shapes]
    with ShardedWriter(directory, specs, max_shard_size=None, weights_name=VQ_WEIGHTS_NAME, force=True,
                       keep=keep_on_resave, metadata={"format": "np", "model_type": config.model_type}) as writer:
        config.save_pretrained(writer.staging)
        for name in writer.order:
            writer.write(name, np.asarray(tensors[name], order="C"))  # (ascontiguousarray makes 0-d 1-d)
    return Path(directory) / VQ_WEIGHTS_NAME


def load_vq_checkpoint(directory: str | os.PathLike) -> tuple[TransformerVQConfig, dict[str, np.ndarray]]:
    """Read a directory written by `save_vq_checkpoint`: the config, and every tensor (a copy),
    matched against the names and shapes the config implies (`match_state`, strict)."""
    config = TransformerVQConfig.from_pretrained(directory)
    # Only the dtype's kind is matched (a float tensor for a float parameter): the model casts.
    expected = {k: (shape, np.dtype(np.float32)) for k, shape in vq_param_shapes(config).items()}
    with CheckpointReader(directory) as reader:
        report = match_state(expected, reader, strict=True)
        tensors = {name: np.array(array) for name, array in iter_tensors(reader, report.sources)}
    return config, tensors


def import_reference_params(tree: Mapping[str, Any], config: TransformerVQConfig) -> dict[str, np.ndarray]:
    """Official Flax parameter tree -> torch-named numpy tensors.

    `tree` is the nested dict under `params` of the reference (with or without the outer
    `params` key): `token_embedder/{embs,bias_out}`, `position_embedder/scale`,
    `transformer_layers_{i}/scanned_attn{1,2}/{input_ln/{g,b}, q_proj/kernel, kvg_proj/kernel,
    r_proj/kernel, res_proj/kernel, u, v, quantizer/{c_sum,c_count}}`, `out_ln/{g,b}`,
    `out_proj/{kernel,bias}`. Dense kernels are `[in, out]` and are transposed.
    """
    if "params" in tree and len(tree) == 1:
        tree = tree["params"]
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, prefix + (str(k),))
        else:
            flat["/".join(prefix)] = np.asarray(node)

    walk(tree, ())
    out: dict[str, np.ndarray] = {}
    for ref_name, value in flat.items():
        parts = ref_name.split("/")
        if parts[0].startswith("transformer_layers_"):
            parts = ["transformer_layers", parts[0].rsplit("_", 1)[1]] + parts[1:]
        if parts[-1] == "kernel":
            parts[-1] = "weight"
            value = value.T
        out[".".join(parts)] = np.array(value, order="C")
    try:
        _check(config, out, "import_reference_params")
    except CheckpointError as e:
        raise CheckpointError(f"{e} (reference tree keys: {sorted(flat)[:4]} ...)") from None
    return out


def validate_tensors(config: TransformerVQConfig, tensors: Mapping[str, np.ndarray]) -> None:
    """Raise `CheckpointError` unless `tensors` has exactly the config's names and shapes."""
    if not isinstance(config, TransformerVQConfig):
        raise ConfigError("<root>", "expected a TransformerVQConfig")
    _check(config, tensors, "tensors")
