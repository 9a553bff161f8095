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
there are no per-model special cases (the Transformer-VQ names follow it too). Files in twinlm's
Flax layout key each tensor by its path joined with dots (`flax_key`).

Also here, once each: the heads (`HEADS`: key -> class name, the same in both twins and HF's
suffix), the label that losses ignore (`IGNORE_INDEX`), every parameter name and shape a config
implies (`hf_shapes`, for every family and head), and the names old checkpoints carry that are
not parameters (`legacy_name`, `is_rotary_buffer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = ["FlaxPath", "HEADS", "IGNORE_INDEX", "flax_key", "flax_path", "hf_key_from_flax", "hf_name", "hf_shapes",
           "is_legacy_name", "is_rotary_buffer", "is_transposed", "legacy_name", "tree_path_names"]

FlaxPath = tuple[Union[str, int], ...]

# Head key (CLI, parity) -> class name: `torch_impl.<name>`, `flax_impl.<name>`, and HF's
# f"{family prefix}{name}" (`LlamaForCausalLM`, `Gemma2ForSequenceClassification`, ...).
HEADS: dict[str, str] = {
    "causal_lm": "ForCausalLM",
    "sequence_classification": "ForSequenceClassification",
    "question_answering": "ForQuestionAnswering",
}

# Labels equal to this are left out of every loss (HF's and PyTorch's convention).
IGNORE_INDEX = -100

# Old `LlamaForQuestionAnswering` checkpoints name the decoder `transformer.`, not `model.`.
_LEGACY_PREFIX, _PREFIX = "transformer.", "model."

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


def flax_key(hf_key: str) -> str:
    """HF name -> the flat key of the Flax layout: the NNX path joined with dots."""
    return ".".join(str(p) for p in flax_path(hf_key))


def hf_key_from_flax(key: str) -> str:
    """Flat Flax-layout key -> HF name (list indices are the all-digit parts)."""
    return hf_name(tuple(int(p) if p.isdigit() else p for p in key.split(".")))


# ---- names in old checkpoints that are not parameters of the twins -------------------------
def is_rotary_buffer(key: str) -> bool:
    """True for rotary `inv_freq` buffers, saved by old transformers versions: recomputed from
    the config by both twins, never loaded."""
    return key.endswith(".inv_freq")


def is_legacy_name(key: str) -> bool:
    """True for a name with the legacy `transformer.` prefix (old QA checkpoints)."""
    return key.startswith(_LEGACY_PREFIX)


def legacy_name(key: str) -> str:
    """The current name of a checkpoint key: the legacy `transformer.` prefix reads as `model.`."""
    return _PREFIX + key[len(_LEGACY_PREFIX):] if is_legacy_name(key) else key


# ---- every parameter a config implies -------------------------------------------------------
def hf_shapes(config: "ModelConfig", head: str = "causal_lm", *,
              tied_head_saved: bool = False) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of every parameter of `config` with `head` (a key of `HEADS`, or
    "decoder" for the bare `DecoderModel`), in the twins' module order, for every family:
    q/k/v(/o) biases, MLP biases, experts, Gemma 2's sandwich norms, a tied head.

    A tied `lm_head.weight` is left out, as transformers saves it, unless `tied_head_saved`.
    Each twin's parameter set equals this table (asserted by the mirror test).
    """
    if head not in HEADS and head != "decoder":
        raise ValueError(f"unknown head {head!r}; one of {', '.join(HEADS)}")
    e, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, k, d = config.num_attention_heads, config.resolved_num_key_value_heads, config.resolved_head_dim
    prefix = "" if head == "decoder" else "model."
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}embed_tokens.weight": (v, e)}
    for n in range(config.num_hidden_layers):
        p = f"{prefix}layers.{n}."
        for proj, (out, inp) in (("q", (h * d, e)), ("k", (k * d, e)), ("v", (k * d, e)), ("o", (e, h * d))):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (out, inp)
            if config.attention_bias or (config.qkv_bias and proj != "o"):
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (out,)
        if config.is_moe:
            shapes[f"{p}block_sparse_moe.gate.weight"] = (config.num_local_experts, e)
            for j in range(config.num_local_experts):
                for w, shape in (("w1", (i, e)), ("w2", (e, i)), ("w3", (i, e))):
                    shapes[f"{p}block_sparse_moe.experts.{j}.{w}.weight"] = shape
        else:
            for proj, (out, inp) in (("gate", (i, e)), ("up", (i, e)), ("down", (e, i))):
                shapes[f"{p}mlp.{proj}_proj.weight"] = (out, inp)
                if config.mlp_bias:
                    shapes[f"{p}mlp.{proj}_proj.bias"] = (out,)
        norms = ["input_layernorm", "post_attention_layernorm"]
        if config.sandwich_norm:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for norm in norms:
            shapes[f"{p}{norm}.weight"] = (e,)
    shapes[f"{prefix}norm.weight"] = (e,)
    if head == "causal_lm":
        if not config.tie_word_embeddings or tied_head_saved:
            shapes["lm_head.weight"] = (v, e)
    elif head == "sequence_classification":
        shapes["score.weight"] = (config.num_labels, e)
    elif head == "question_answering":
        shapes["qa_outputs.weight"] = (2, e)
        shapes["qa_outputs.bias"] = (2,)
    return shapes
def tree_path_names(tree_path: tuple) -> FlaxPath:
    """The parameter path of a JAX tree path into an NNX state (as `jax.tree_util` hands it to
    `tree_map_with_path`, e.g. for an optax mask or label function): dict keys and sequence
    indices, without the attribute key that leads into a `Variable`'s value. Duck-typed, so this
    module stays free of jax."""
    names: list[Union[str, int]] = []
    for entry in tree_path:
        if hasattr(entry, "key"):  # DictKey (NNX State keys, nnx.List indices)
            names.append(entry.key)
        elif hasattr(entry, "idx"):  # SequenceKey
            names.append(entry.idx)
    return tuple(names)
