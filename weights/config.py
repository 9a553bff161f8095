"""`ModelConfig`: the one configuration of the LLaMA-family decoder, read from and written to
Hugging Face `config.json`.

Both spellings of transformers 4.x and 5.x are read (`torch_dtype`/`dtype`,
`rope_scaling`/`rope_parameters`, `type`/`rope_type`). Keys that the config does not model are
kept verbatim in `extra` and written back unchanged, so a round trip never loses a field.

The config is frozen and hashable (Flax keeps it as static module metadata, and `jax.jit`
caches on it): mappings are stored as sorted tuples of pairs and exposed as dicts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "ROPE_TYPES", "ACTIVATIONS"]

CONFIG_NAME = "config.json"

# Rotary scalings the twins implement, with the keys each one needs (HF names).
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# Activations of the gated MLP, by their HF `ACT2FN` names.
ACTIVATIONS: tuple[str, ...] = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field and the rule."""

    def __init__(self, field_name: str, rule: str, *, source: str | None = None):
        self.field = field_name
        self.rule = rule
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config field '{field_name}': {rule}")


def _freeze(value: Any) -> Any:
    """JSON-like value -> hashable (dicts become sorted tuples of pairs, lists tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of `_freeze` for values written to JSON (pairs-tuples become dicts)."""
    if isinstance(value, tuple):
        if value and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value):
            return {k: _thaw(v) for k, v in value}
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding scaling, HF `rope_scaling` / `rope_parameters`.

    `default` leaves frequencies as `1 / theta^(2i/d)`; `linear` divides positions by `factor`;
    `dynamic` (NTK-aware) raises theta once the sequence passes `max_position_embeddings`;
    `llama3` rescales low and medium frequencies (Llama 3.1's long-context recipe).
    """

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float | None = None  # linear / dynamic / llama3: the scaling factor
    low_freq_factor: float | None = None  # llama3: wavelengths above orig/low are divided by factor
    high_freq_factor: float | None = None  # llama3: wavelengths below orig/high are kept
    original_max_position_embeddings: int | None = None  # llama3: the pre-training context
    extra: tuple[tuple[str, Any], ...] = ()  # keys not modelled here, written back unchanged

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type}
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        d.update(_thaw(self.extra) if self.extra else {})
        return d


def _rope_from_hf(d: Mapping[str, Any] | None, source: str | None) -> RopeScaling | None:
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ConfigError("rope_scaling", f"must be an object or null, got {type(d).__name__}", source=source)
    d = dict(d)
    # transformers 4.x wrote "type", later versions "rope_type"; 5.x keeps rope_theta in here too.
    rope_type = d.pop("rope_type", None) or d.pop("type", None) or "default"
    d.pop("type", None)
    d.pop("rope_theta", None)
    known = {k: d.pop(k) for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k in d}
    return RopeScaling(rope_type=rope_type, extra=_freeze(d), **known)


# HF key -> ModelConfig field, where the two differ or several spellings exist.
_ALIASES = {"dtype": "torch_dtype", "rope_parameters": "rope_scaling"}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a LLaMA-family decoder, with HF `config.json` names and defaults.

    Derived values (`head_dim` when absent, kv groups) are properties, never stored twice.
    Construction validates every rule and raises `ConfigError` naming the field.
    """

    vocab_size: int = 32000  # all: rows of the embedding and columns of the LM head
    hidden_size: int = 4096  # all: model width E
    intermediate_size: int = 11008  # all: width of the gated MLP
    num_hidden_layers: int = 32  # all: decoder layers
    num_attention_heads: int = 32  # all: query heads H
    num_key_value_heads: int | None = None  # all: kv heads K (GQA/MQA); None means = heads (MHA)
    head_dim: int | None = None  # all: per-head width D; None means hidden_size // heads
    hidden_act: str = "silu"  # all: activation of the MLP gate (silu = SwiGLU)
    max_position_embeddings: int = 2048  # all: trained context; dynamic rope scales past it
    rms_norm_eps: float = 1e-6  # all: epsilon inside the RMSNorm square root
    rope_theta: float = 10000.0  # all: rotary base
    rope_scaling: RopeScaling | None = None  # llama 2/3: rotary scaling variant, None = default
    attention_bias: bool = False  # llama: bias on q/k/v/o projections
    mlp_bias: bool = False  # llama: bias on gate/up/down projections
    tie_word_embeddings: bool = False  # all: LM head shares the input embedding matrix
    initializer_range: float = 0.02  # all: std of the normal init of linear and embedding weights
    pad_token_id: int | None = None  # all: padding token (embedding row zeroed at init; cls pooling)
    bos_token_id: int | tuple[int, ...] | None = 1  # all: beginning-of-sequence token(s)
    eos_token_id: int | tuple[int, ...] | None = 2  # all: end-of-sequence token(s)
    num_labels: int = 2  # sequence classification: number of classes
    problem_type: str | None = None  # sequence classification: regression / single_label_... / multi_label_...
    model_type: str = "llama"  # the HF family name
    architectures: tuple[str, ...] | None = None  # HF class names the checkpoint was saved from
    torch_dtype: str | None = None  # dtype the checkpoint's tensors were saved in
    extra: tuple[tuple[str, Any], ...] = field(default=(), repr=False)  # unmodelled keys, kept verbatim

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived values -------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        """Per-head width D: `head_dim` when set, else hidden_size // num_attention_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def resolved_num_key_value_heads(self) -> int:
        """kv heads K: `num_key_value_heads` when set, else the query head count."""
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        """Query heads sharing one kv head (H / K)."""
        return self.num_attention_heads // self.resolved_num_key_value_heads

    @property
    def rope(self) -> RopeScaling:
        """The rotary scaling, `default` when none is configured."""
        return self.rope_scaling if self.rope_scaling is not None else RopeScaling()

    @property
    def extra_dict(self) -> dict[str, Any]:
        """Unmodelled config keys as a dict."""
        return {k: _thaw(v) for k, v in self.extra}

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------------
    def validate(self, source: str | None = None) -> None:
        """Raise `ConfigError` naming the first field that breaks a rule."""

        def fail(name: str, msg: str) -> None:
            raise ConfigError(name, msg, source=source)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "num_labels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                fail(name, f"must be a positive integer, got {v!r}")
        for name in ("num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                fail(name, f"must be a positive integer or null, got {v!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"{self.num_attention_heads} heads do not divide hidden_size "
                 f"{self.hidden_size}; set head_dim explicitly")
        if self.resolved_head_dim % 2:
            fail("head_dim", f"rotary embedding needs an even head_dim, got {self.resolved_head_dim}")
        kv = self.resolved_num_key_value_heads
        if self.num_attention_heads % kv:
            fail("num_key_value_heads", f"{kv} kv heads do not divide num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"unknown activation {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                fail(name, f"must be a positive finite number, got {v!r}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            fail("pad_token_id", f"{self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            fail("problem_type", f"unknown problem type {self.problem_type!r}")
        self._validate_rope(fail)

    def _validate_rope(self, fail) -> None:
        r = self.rope_scaling
        if r is None:
            return
        if r.rope_type not in ROPE_TYPES:
            fail("rope_scaling", f"unknown rope type {r.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        for key in ROPE_TYPES[r.rope_type]:
            if getattr(r, key) is None:
                fail("rope_scaling", f"rope type {r.rope_type!r} needs '{key}'")
        if r.factor is not None and (not math.isfinite(r.factor) or r.factor < 1.0) and r.rope_type != "default":
            fail("rope_scaling", f"'factor' must be >= 1, got {r.factor}")
        if r.rope_type == "llama3":
            if not r.high_freq_factor > r.low_freq_factor > 0:
                fail("rope_scaling", "llama3 needs high_freq_factor > low_freq_factor > 0, got "
                     f"{r.high_freq_factor} and {r.low_freq_factor}")
            if r.original_max_position_embeddings <= 0:
                fail("rope_scaling", "'original_max_position_embeddings' must be positive")

    # ---- HF config.json -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str | None = None) -> "ModelConfig":
        """Build from a parsed HF `config.json`; absent keys take HF's defaults."""
        if not isinstance(d, Mapping):
            raise ConfigError("<root>", f"config must be a JSON object, got {type(d).__name__}", source=source)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            name = _ALIASES.get(key, key)
            if name in names and name not in kwargs:
                kwargs[name] = value
            elif name not in names:
                extra[key] = value
        # 5.x keeps rope_theta inside rope_parameters.
        rp = d.get("rope_parameters")
        if "rope_theta" not in kwargs and isinstance(rp, Mapping) and "rope_theta" in rp:
            kwargs["rope_theta"] = rp["rope_theta"]
        kwargs["rope_scaling"] = _rope_from_hf(kwargs.get("rope_scaling"), source)
        if kwargs["rope_scaling"] is not None and kwargs["rope_scaling"].rope_type == "default" \
                and not kwargs["rope_scaling"].extra:
            kwargs["rope_scaling"] = None
        for name in ("bos_token_id", "eos_token_id", "architectures"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if isinstance(kwargs.get(name), int) and not isinstance(kwargs.get(name), bool):
                kwargs[name] = float(kwargs[name])
        if "num_labels" not in kwargs and isinstance(d.get("id2label"), Mapping):
            kwargs["num_labels"] = len(d["id2label"])
        try:
            cfg = cls(**kwargs, extra=_freeze(extra))
        except ConfigError as e:
            if source is None:
                raise
            raise ConfigError(e.field, e.rule, source=source) from None
        except TypeError as e:  # a value of the wrong JSON type reaching a comparison
            raise ConfigError("<root>", f"invalid value type: {e}", source=source) from None
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` mapping: modelled fields plus the unmodelled keys, unchanged."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.name == "rope_scaling":
                v = v.to_hf_dict() if v is not None else None
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        d.update(self.extra_dict)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ModelConfig":
        """Read `<directory>/config.json`."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError("<file>", "config.json not found", source=str(path))
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError("<file>", f"not valid JSON ({e})", source=str(path)) from None
        return cls.from_hf_dict(d, source=str(path))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `<directory>/config.json` atomically (temporary file, then rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path
