"""Name and layout rules: HF tensor name <-> Flax NNX parameter path.

The torch twin's `state_dict()` keys *are* the HF names. The Flax twin uses the same attribute
names, so its parameter path is the HF name split at dots, with list indices as ints, and with
the leaf renamed by the kind of module that owns it:

| HF leaf                        | Flax leaf    | layout                         |
|--------------------------------|--------------|--------------------------------|
| `<linear>.weight` `[out, in]`  | `kernel`     | transposed to `[in, out]`      |
| `<linear>.bias`                | `bias`       | as is                          |
| `embed_tokens.weight`          | `embedding`  | as is (`nnx.Embed`)            |
| `<norm>.weight`                | `weight`     | as is (twinlm's own `RMSNorm`) |

A module is a norm when its name ends in `norm` (`input_layernorm`, `norm`, `q_norm`, ...), an
embedding when it is `embed_tokens`, and a linear layer otherwise. The table is the whole rule:
there are no per-model special cases.
"""

from __future__ import annotations

from typing import Union

__all__ = ["FlaxPath", "flax_path", "hf_name", "is_transposed"]

FlaxPath = tuple[Union[str, int], ...]

_EMBEDDINGS = ("embed_tokens",)


def _kind(module: str) -> str:
    if module in _EMBEDDINGS:
        return "embedding"
    if module.endswith("norm"):
        return "norm"
    return "linear"


def is_transposed(hf_key: str) -> bool:
    """True when the Flax array is the transpose of the HF tensor (linear weights)."""
    parts = hf_key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and _kind(parts[-2]) == "linear"


def flax_path(hf_key: str) -> FlaxPath:
    """HF tensor name -> Flax NNX parameter path, e.g.
    `model.layers.0.self_attn.q_proj.weight` -> `('model', 'layers', 0, 'self_attn', 'q_proj', 'kernel')`.
    """
    parts = hf_key.split(".")
    if len(parts) < 2:
        raise ValueError(f"tensor name {hf_key!r} has no module: expected '<module>.<weight|bias>'")
    leaf, module = parts[-1], parts[-2]
    if leaf == "weight":
        leaf = {"linear": "kernel", "embedding": "embedding", "norm": "weight"}[_kind(module)]
    path: list[Union[str, int]] = [int(p) if p.isdigit() else p for p in parts[:-1]]
    return tuple(path) + (leaf,)


def hf_name(path: FlaxPath) -> str:
    """Flax NNX parameter path -> HF tensor name (the inverse of `flax_path`)."""
    if len(path) < 2:
        raise ValueError(f"parameter path {path!r} has no module")
    *prefix, leaf = path
    if leaf in ("kernel", "embedding"):
        leaf = "weight"
    return ".".join(str(p) for p in prefix) + "." + str(leaf)
