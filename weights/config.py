"""`ModelConfig`: the one configuration of the LLaMA-family decoder, read from and written to
Hugging Face `config.json`.

Both spellings of transformers 4.x and 5.x are read (`torch_dtype`/`dtype`,
`rope_scaling`/`rope_parameters`, `type`/`rope_type`) and written back in the spelling the source
used. Keys that the config does not model are kept verbatim in `extra` and written back
unchanged, so `from_hf_dict(d).to_hf_dict()` keeps every key and value of `d`.

Families (llama, mistral, mixtral, qwen2, gemma, gemma2) are sets of field values defined in
`weights.families.FAMILIES`, keyed by `model_type`; an unknown family or a switch the twins do
not implement is refused with a `ConfigError` naming the field.

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

from .families import FAMILIES, LAYER_TYPES, validate_switches

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "ROPE_TYPES", "ACTIVATIONS", "LAYER_TYPES"]

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
    type_key: str = field(default="rope_type", compare=False)  # source spelling: "rope_type" or 4.x "type"

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {self.type_key: self.rope_type}
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        d.update(_thaw(self.extra) if self.extra else {})
        return d


def _rope_from_hf(d: Mapping[str, Any] | None, key: str, source: str | None) -> RopeScaling | None:
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ConfigError(key, f"must be an object or null, got {type(d).__name__}", source=source)
    d = dict(d)
    if any(isinstance(v, Mapping) for v in d.values()):
        raise ConfigError(key, "per-layer-type rotary parameters (one object per attention kind) "
                          "are not supported", source=source)
    # transformers 4.x wrote "type", later versions "rope_type" (some files carry both: the
    # other one then stays in `extra`); 5.x keeps rope_theta in here too (ModelConfig.rope_theta).
    type_key = "rope_type" if "rope_type" in d else "type" if "type" in d else "rope_type"
    rope_type = d.pop(type_key, None) or "default"
    d.pop("rope_theta", None)
    known = {k: d.pop(k) for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k in d}
    return RopeScaling(rope_type=rope_type, extra=_freeze(d), type_key=type_key, **known)


# ModelConfig field -> its HF spellings, the canonical (written when the source had none) first.
_SPELLINGS = {"torch_dtype": ("torch_dtype", "dtype"), "rope_scaling": ("rope_scaling", "rope_parameters")}
_ALIASES = {key: name for name, keys in _SPELLINGS.items() for key in keys}

# Fields written to config.json always; the family/switch fields after them are written only
# when the source had them or they differ from the family's value (a Llama config.json gets no
# Gemma switches).
_CORE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings",
                "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id", "num_labels", "problem_type",
                "model_type", "architectures", "torch_dtype")

# Unmodelled HF keys that switch on behaviour the twins do not implement: key -> (allowed, why).
_UNSUPPORTED_EXTRA = {
    "partial_rotary_factor": ((1, 1.0, None), "partial rotary embeddings are not implemented (only 1.0)"),
    "attention_dropout": ((0, 0.0, None), "dropout is not implemented: the twins compute eval-mode passes"),
    "use_bidirectional_attention": ((False, None), "bidirectional attention is not implemented"),
}


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
    attention_bias: bool = False  # llama, gemma: bias on q/k/v/o projections
    mlp_bias: bool = False  # llama: bias on gate/up/down projections
    qkv_bias: bool = False  # qwen2: bias on q/k/v only, o_proj has none (Qwen2Attention hard-codes it)
    hidden_activation: str | None = None  # gemma, gemma2: the MLP activation; when set it wins over hidden_act
    activation_fallback: str | None = None  # gemma, gemma2: activation when hidden_activation is null (hidden_act ignored)
    sliding_window: int | None = None  # mistral, mixtral, qwen2, gemma2: query i sees cache slots j with i - j < window
    use_sliding_window: bool = False  # qwen2: window on at all (mistral, mixtral, gemma2: always on)
    max_window_layers: int = 0  # qwen2: layers with index below this one attend globally
    sliding_window_pattern: int | None = None  # gemma2 (2): layer i is global when (i + 1) % n == 0; None = all slide
    layer_types: tuple[str, ...] | None = None  # qwen2, gemma2 (4.53+): explicit per-layer kinds, one of LAYER_TYPES
    query_pre_attn_scalar: float | None = None  # gemma2: scores scaled by this ** -0.5 instead of head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # gemma2 (50), grok-1 (30): scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # gemma2 (30): LM logits -> cap * tanh(logits / cap)
    norm_unit_offset: bool = False  # gemma, gemma2: RMSNorm scales by (1 + weight) in float32; weights init to 0
    scale_embeddings: bool = False  # gemma, gemma2, grok-1: embeddings times sqrt(hidden_size) rounded to the dtype
    sandwich_norm: bool = False  # gemma2, grok-1: a norm after attention and after the MLP too, before each residual add
    num_local_experts: int | None = None  # mixtral: experts per MoE layer (block_sparse_moe); None = dense MLP
    num_experts_per_tok: int = 2  # mixtral: experts each token is routed to (top-k)
    norm_topk_prob: bool = True  # mixtral: top-k routing weights renormalised to sum 1; grok-1: False (raw probs)
    router_aux_loss_coef: float = 0.001  # mixtral: weight of the load-balancing loss added to the LM loss
    output_router_logits: bool = False  # mixtral: return router logits and the aux loss
    router_jitter_noise: float = 0.0  # mixtral: training-time input noise; only 0 is implemented
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
    source_keys: tuple[str, ...] = field(default=(), repr=False, compare=False)  # keys of the config.json read

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
    def mlp_activation(self) -> str:
        """The activation the MLP applies: `hidden_activation`, else the family fallback, else `hidden_act`."""
        if self.hidden_activation is not None:
            return self.hidden_activation
        return self.activation_fallback if self.activation_fallback is not None else self.hidden_act

    @property
    def attention_qkv_bias(self) -> bool:
        """Whether q/k/v projections have a bias (llama/gemma `attention_bias`, or qwen2's `qkv_bias`)."""
        return self.attention_bias or self.qkv_bias

    @property
    def query_scaling(self) -> float:
        """Multiplier of the q.k scores: `query_pre_attn_scalar ** -0.5` (gemma2) or `head_dim ** -0.5`."""
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.resolved_head_dim
        return base ** -0.5

    @property
    def resolved_layer_types(self) -> tuple[str, ...]:
        """Per layer, "full_attention" or "sliding_attention": `layer_types`, else the family rule."""
        if self.layer_types is not None:
            return self.layer_types

        def slides(i: int) -> bool:
            pattern = self.sliding_window_pattern
            return (self.use_sliding_window and self.sliding_window is not None and i >= self.max_window_layers
                    and (pattern is None or (i + 1) % pattern != 0))

        return tuple("sliding_attention" if slides(i) else "full_attention" for i in range(self.num_hidden_layers))

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer, its attention window in cache slots, or None for global attention."""
        on = self.use_sliding_window and self.sliding_window is not None
        return tuple(self.sliding_window if on and kind == "sliding_attention" else None
                     for kind in self.resolved_layer_types)

    @property
    def is_moe(self) -> bool:
        """Whether each layer's feed-forward is a mixture of experts (`block_sparse_moe`)."""
        return self.num_local_experts is not None

    @property
    def hf_class_prefix(self) -> str:
        """HF class-name prefix of the family (`Gemma2` -> `Gemma2ForCausalLM`)."""
        return FAMILIES[self.model_type].class_prefix

    @classmethod
    def for_family(cls, model_type: str, **fields: Any) -> "ModelConfig":
        """A config of family `model_type`: the family's values, overridden by `fields`."""
        if model_type not in FAMILIES:
            raise ConfigError("model_type", f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
        return cls(**{**FAMILIES[model_type].values, "model_type": model_type, **fields})

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
        self._validate_family(fail)

    def _validate_rope(self, fail) -> None:
        r = self.rope_scaling
        if r is None:
            return
        key = self._spelling("rope_scaling")
        if r.rope_type not in ROPE_TYPES:
            fail(key, f"unknown rope type {r.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        for name in ROPE_TYPES[r.rope_type]:
            if getattr(r, name) is None:
                fail(key, f"rope type {r.rope_type!r} needs '{name}'")
        if r.factor is not None and (not math.isfinite(r.factor) or r.factor < 1.0) and r.rope_type != "default":
            fail(key, f"'factor' must be >= 1, got {r.factor}")
        if r.rope_type == "dynamic" and self.resolved_head_dim <= 2:
            fail(key, "dynamic NTK scaling raises theta to the power d / (d - 2): head_dim must be > 2")
        if r.rope_type == "llama3":
            if not r.high_freq_factor > r.low_freq_factor > 0:
                fail(key, "llama3 needs high_freq_factor > low_freq_factor > 0, got "
                     f"{r.high_freq_factor} and {r.low_freq_factor}")
            if r.original_max_position_embeddings <= 0:
                fail(key, "'original_max_position_embeddings' must be positive")
        extra = dict(r.extra)
        if extra.get("partial_rotary_factor", 1.0) not in (1, 1.0):
            fail(key, f"'partial_rotary_factor' {extra['partial_rotary_factor']} is not supported (only 1.0)")
        if "mrope_section" in extra:
            fail(key, "multimodal rotary sections ('mrope_section') are not supported")

    def _validate_family(self, fail) -> None:
        validate_switches(self, fail, ACTIVATIONS)
        extra = self.extra_dict
        for name, (allowed, why) in _UNSUPPORTED_EXTRA.items():
            if name in extra and extra[name] not in allowed:
                fail(name, f"{why}; got {extra[name]!r}")

    def _spelling(self, name: str) -> str:
        """The key `name` had in the source config.json, or its canonical HF key."""
        spellings = _SPELLINGS.get(name, (name,))
        return next((k for k in self.source_keys if k in spellings), spellings[0])

    # ---- HF config.json -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str | None = None) -> "ModelConfig":
        """Build from a parsed HF `config.json`; absent keys take HF's defaults."""
        if not isinstance(d, Mapping):
            raise ConfigError("<root>", f"config must be a JSON object, got {type(d).__name__}", source=source)
        model_type = d.get("model_type", "llama")
        if not isinstance(model_type, str) or model_type not in FAMILIES:
            raise ConfigError("model_type", f"unsupported model_type {model_type!r}; supported: "
                              f"{', '.join(FAMILIES)}", source=source)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "source_keys"}
        # The family's values first: keys absent from config.json take that family's HF defaults.
        kwargs: dict[str, Any] = dict(FAMILIES[model_type].values)
        seen: set[str] = set()
        extra: dict[str, Any] = {}
        for key, value in d.items():
            name = _ALIASES.get(key, key)
            if name in names and name not in seen:
                kwargs[name] = value
                seen.add(name)
            else:  # unmodelled, or a second spelling of a field already read: kept verbatim
                extra[key] = value
        # 5.x keeps rope_theta inside rope_parameters.
        rp = d.get("rope_parameters")
        if "rope_theta" not in d and isinstance(rp, Mapping) and "rope_theta" in rp:
            kwargs["rope_theta"] = rp["rope_theta"]
        rope_key = next((k for k in d if _ALIASES.get(k) == "rope_scaling"), "rope_scaling")
        kwargs["rope_scaling"] = _rope_from_hf(kwargs.get("rope_scaling"), rope_key, source)
        for name in ("bos_token_id", "eos_token_id", "architectures", "layer_types"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if isinstance(kwargs.get(name), int) and not isinstance(kwargs.get(name), bool):
                kwargs[name] = float(kwargs[name])
        if "num_labels" not in kwargs and isinstance(d.get("id2label"), Mapping):
            kwargs["num_labels"] = len(d["id2label"])
        try:
            cfg = cls(**kwargs, extra=_freeze(extra), source_keys=tuple(str(k) for k in d))
        except ConfigError as e:
            if source is None:
                raise
            raise ConfigError(e.field, e.rule, source=source) from None
        except TypeError as e:  # a value of the wrong JSON type reaching a comparison
            raise ConfigError("<root>", f"invalid value type: {e}", source=source) from None
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` mapping: modelled fields plus the unmodelled keys, unchanged.

        Keys keep the spelling of the config.json this was read from. Core fields are always
        written; family/switch fields when the source had them or they differ from the family.
        """
        family = {f.name: f.default for f in dataclasses.fields(self)} | FAMILIES[self.model_type].values
        present = set(self.source_keys)
        rope_key = self._spelling("rope_scaling")
        # 5.x configs keep rope_theta inside rope_parameters, with no top-level key.
        theta_inside = rope_key == "rope_parameters" and "rope_theta" not in present and self.rope_scaling is not None
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "source_keys") or (f.name == "rope_theta" and theta_inside):
                continue
            key, v = self._spelling(f.name), getattr(self, f.name)
            if f.name not in _CORE_FIELDS and key not in present and v == family[f.name]:
                continue
            if f.name == "rope_scaling":
                v = v.to_hf_dict() if v is not None else None
                if theta_inside:
                    v["rope_theta"] = self.rope_theta
            elif isinstance(v, tuple):
                v = list(v)
            d[key] = v
        d.update(self.extra_dict)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ModelConfig":
        """Read `<directory>/config.json`."""
        d, source = read_config_json(directory)
        return cls.from_hf_dict(d, source=source)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `<directory>/config.json` atomically (temporary file, then rename)."""
        return write_config_json(directory, self.to_hf_dict())


def read_config_json(directory: str | os.PathLike) -> tuple[Any, str]:
    """The parsed `<directory>/config.json` and its path; `ConfigError` when absent or not JSON."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError("<file>", "config.json not found", source=str(path))
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError("<file>", f"not valid JSON ({e})", source=str(path)) from None


def write_config_json(directory: str | os.PathLike, d: Mapping[str, Any]) -> Path:
    """Write `<directory>/config.json` atomically: a temporary file renamed into place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
