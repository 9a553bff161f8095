"""Parameter tables: for each parameter any family and head can have, its HF name, torch
attribute, NNX path, shape, whether the Flax array is the transpose, and the dtype rule — every
column derived from `weights.names`: `hf_shapes` (every parameter name and shape a config
implies, the table each twin's parameter set is tested against), `flax_path` and `is_transposed`
(the converter's rule).

The models are `parity.strategies.family_examples()` (one per family, its switches on) as causal
LMs, and the first of them with each other head: every parameter name the demo models have.
Shapes are given in the axis legend: each is built on a "probe" config whose axes all have
different sizes (E 48, I 80, H·D 64, K·D 32, V 96, ...), so each size names one axis.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache

from weights.names import HEADS, flax_path, hf_shapes, is_transposed

from .components import component_of_parameter

__all__ = ["ParamRow", "parameter_rows", "pattern_of"]

# Sizes for the probe configs; every product the parameters use is distinct.
_PROBE = dict(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              vocab_size=96, num_hidden_layers=2, num_labels=5)
_SYMBOLS = {48: "E", 80: "I", 64: "H·D", 32: "K·D", 96: "V", 5: "C", 16: "D", 2: "2"}
_EXPERTS = 3
_SYMBOLS[_EXPERTS] = "X"


@dataclass(frozen=True)
class ParamRow:
    """One row of a parameter table (one pattern, e.g. `model.layers.{i}.self_attn.q_proj.weight`)."""

    pattern: str
    torch_attr: str
    nnx_path: str
    shape: str  # HF layout, in the axis legend
    transposed: bool
    dtype_rule: str
    models: tuple[str, ...]  # the family examples (and heads) that have it
    component: str | None


def pattern_of(hf_name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `model.layers.{i}.mlp.up_proj.weight` (and experts `{j}`)."""
    name = re.sub(r"\.layers\.\d+\.", ".layers.{i}.", hf_name)
    return re.sub(r"\.experts\.\d+\.", ".experts.{j}.", name)


def _torch_attr(pattern: str) -> str:
    return re.sub(r"\.(\{[ij]\})\.", r"[\1].", pattern)


def _nnx_path(pattern: str) -> str:
    concrete = pattern.replace("{i}", "0").replace("{j}", "0")
    parts = flax_path(concrete)
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    text = text.replace("layers[0]", "layers[{i}]")
    return text.replace("experts[0]", "experts[{j}]")


def _dtype_rule(pattern: str, gemma_like: bool) -> str:
    leaf = pattern.rsplit(".", 1)[-1]
    module = pattern.rsplit(".", 2)[-2]
    if module.endswith("norm"):
        return "statistics in float32; LLaMA: x cast to dtype, then × w; Gemma: × (1 + w) in float32, then cast"
    if module == "embed_tokens":
        return "looked up in dtype" + ("; Gemma: × sqrt(E) rounded to dtype" if gemma_like else "")
    if leaf == "bias":
        return "added in dtype"
    return "matmul in dtype"


def _shape_symbols(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(_SYMBOLS.get(n, str(n)) for n in shape) + "]"


def _examples() -> list[tuple[str, str, object]]:
    """(label, head, config): each family example as a causal LM, the first with the other heads."""
    from parity.strategies import family_examples

    examples = family_examples()
    first = next(iter(examples))
    return ([(name, "causal_lm", cfg) for name, cfg in examples.items()]
            + [(f"{first} {head.replace('_', ' ')}", head, examples[first]) for head in HEADS if head != "causal_lm"])


@lru_cache(maxsize=1)
def parameter_rows() -> tuple[ParamRow, ...]:
    """Every parameter pattern of every family and head, in the twins' module order."""
    rows: dict[str, dict] = {}
    for label, head, cfg in _examples():
        probe = dict(_PROBE)
        if cfg.num_local_experts:
            probe["num_local_experts"] = _EXPERTS
            probe["num_experts_per_tok"] = min(cfg.num_experts_per_tok or 1, _EXPERTS)
        for name, shape in hf_shapes(dataclasses.replace(cfg, **probe), head).items():
            pat = pattern_of(name)
            row = rows.setdefault(pat, dict(shape=shape, models=[], gemma=False))
            if label not in row["models"]:
                row["models"].append(label)
            row["gemma"] |= bool(cfg.scale_embeddings)
    out = []
    for pat, r in rows.items():
        concrete = pat.replace("{i}", "0").replace("{j}", "0")
        out.append(ParamRow(pat, _torch_attr(pat), _nnx_path(pat), _shape_symbols(r["shape"]), is_transposed(concrete),
                            _dtype_rule(pat, r["gemma"]), tuple(r["models"]), component_of_parameter(concrete)))
    return tuple(out)
