"""`ModelConfig`: the one configuration of the LLaMA-family decoder, a frozen dataclass with
all its validation.

Families (llama, mistral, mixtral, qwen2, gemma, gemma2) are sets of field values defined in
`weights.families.FAMILIES`, keyed by `model_type`; an unknown family or a switch the twins do
not implement is refused with a `ConfigError` naming the field. Every rule is checked here, on
construction.

Reading and writing Hugging Face `config.json` (both spellings of transformers 4.x and 5.x,
unmodelled keys kept verbatim) is the spelling layer, `weights.hf_config`; the methods
`from_hf_dict`, `to_hf_dict`, `from_pretrained` and `save_pretrained` call into it.

The config is frozen and hashable (Flax keeps it as static module metadata, and `jax.jit`
caches on it): mappings are stored as sorted tuples of pairs and exposed as dicts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import hf_config
from .errors import ConfigError
from .families import FAMILIES, LAYER_TYPES

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "ROPE_TYPES", "ACTIVATIONS", "LAYER_TYPES", "SIZE_LIMITS"]

# Rotary scalings the twins implement, with the keys each one needs (HF names).
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# Activations of the gated MLP, by their HF `ACT2FN` names.
ACTIVATIONS: tuple[str, ...] = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")


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
        """The HF `rope_scaling` object, in the spelling it was read with."""
        return hf_config.rope_to_hf(self)


# Unmodelled HF keys that switch on behaviour the twins do not implement: key -> (allowed, why).
_UNSUPPORTED_EXTRA = {
    "partial_rotary_factor": ((1, 1.0, None), "partial rotary embeddings are not implemented (only 1.0)"),
    "use_bidirectional_attention": ((False, None), "bidirectional attention is not implemented"),
}


# Upper bounds of the sizes (and counts) a config may hold: far above every released model (the
# largest known value is in each comment), low enough that a typo or a hostile config.json is
# refused before anything is allocated. Memory is bounded separately, from the product of sizes
# (`weights.shapes`), against what the machine has.
SIZE_LIMITS: dict[str, int] = {
    "vocab_size": 1 << 24,  # 16.8 M; released vocabularies reach 262 k (Gemma 3)
    "hidden_size": 1 << 17,  # 131 k; Llama 3.1 405B: 16 k
    "intermediate_size": 1 << 20,  # 1 M; Llama 3.1 405B: 53 k
    "num_hidden_layers": 1 << 10,  # 1024; Llama 3.1 405B: 126
    "num_attention_heads": 1 << 12,  # 4096; Llama 3.1 405B: 128
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 12,  # 4096; released: up to 256
    "max_position_embeddings": 1 << 26,  # 67 M; Llama 4 Scout: 10 M
    "original_max_position_embeddings": 1 << 26,
    "num_labels": 1 << 20,
    "sliding_window": 1 << 26,
    "sliding_window_pattern": 1 << 10,
    "max_window_layers": 1 << 20,  # qwen2 configs carry 28..80 whatever the depth
    "num_local_experts": 1 << 12,  # 4096; DeepSeek-V3: 256
    "num_experts_per_tok": 1 << 12,
}


def _show(value: Any) -> str:
    """A config value as an error quotes it: its repr, cut short (one line, whatever the file held)."""
    if _is_int(value) and value.bit_length() > 64:  # repr of a huge int is slow, or refused past 4300 digits
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite_number(v: Any) -> bool:
    # An int too large for a float (10**400) is not a usable number either.
    if _is_int(v):
        return abs(v) < 2 ** 1023
    return isinstance(v, float) and math.isfinite(v)


def _check_size(fail, name: str, v: Any, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    """An int (never a bool) in [1 (or 0), SIZE_LIMITS[name]], or null when allowed."""
    if v is None and allow_none:
        return
    low, high = (0 if allow_zero else 1), SIZE_LIMITS[name]
    if not _is_int(v) or not low <= v <= high:
        kind = "a non-negative" if allow_zero else "a positive"
        fail(name, f"must be {kind} integer <= {high}{' or null' if allow_none else ''}, got {_show(v)}")


def _check_number(fail, name: str, v: Any, *, allow_zero: bool = False, or_null: bool = False) -> None:
    """A finite number (int or float, never a bool), positive (or zero when allowed)."""
    if not _is_finite_number(v) or v < 0 or (v == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        fail(name, f"must be {kind} finite number{' or null' if or_null else ''}, got {_show(v)}")


def _check_bool(fail, name: str, v: Any) -> None:
    if not isinstance(v, bool):
        fail(name, f"must be true or false, got {_show(v)}")


def _check_token_id(fail, name: str, v: Any, vocab_size: int) -> None:
    """A token id: null, or an int (never a bool) in [0, vocab_size)."""
    if v is None:
        return
    if not _is_int(v):
        fail(name, f"must be an integer token id (or a list of them), got {_show(v)}")
    if not 0 <= v < vocab_size:
        fail(name, f"{_show(v)} is outside the vocabulary [0, {vocab_size})")


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
    attention_dropout: float = 0.0  # all (HF): dropout on the attention probabilities, train mode only
    hidden_dropout: float = 0.0  # twinlm (GPT-NeoX's name): dropout on the embeddings and on each block's output before its residual add, train mode only
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
            raise ConfigError("model_type", f"unsupported model_type {_show(model_type)}; supported: {', '.join(FAMILIES)}")
        return cls(**{**FAMILIES[model_type].values, "model_type": model_type, **fields})

    @property
    def rope(self) -> RopeScaling:
        """The rotary scaling, `default` when none is configured."""
        return self.rope_scaling if self.rope_scaling is not None else RopeScaling()

    @property
    def extra_dict(self) -> dict[str, Any]:
        """Unmodelled config keys as a dict."""
        return {k: hf_config.thaw(v) for k, v in self.extra}

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------------
    def validate(self, source: str | None = None) -> None:
        """Raise `ConfigError` naming the first field that breaks a rule.

        Types first (every size an int, never a bool; every number finite; token ids ints in the
        vocabulary; `architectures` a list of strings), then bounds (`SIZE_LIMITS`), then the
        rules between fields. Nothing here allocates: a config that passes is safe to build.
        """

        def fail(name: str, msg: str) -> None:
            raise ConfigError(name, msg, source=source)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "num_labels"):
            _check_size(fail, name, getattr(self, name))
        for name in ("num_key_value_heads", "head_dim"):
            _check_size(fail, name, getattr(self, name), allow_none=True)
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"{self.num_attention_heads} heads do not divide hidden_size "
                 f"{self.hidden_size}; set head_dim explicitly")
        if self.resolved_head_dim % 2:
            fail("head_dim", f"rotary embedding needs an even head_dim, got {self.resolved_head_dim}")
        kv = self.resolved_num_key_value_heads
        if self.num_attention_heads % kv:
            fail("num_key_value_heads", f"{kv} kv heads do not divide num_attention_heads {self.num_attention_heads}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"unknown activation {_show(self.hidden_act)}; supported: {', '.join(ACTIVATIONS)}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            _check_number(fail, name, getattr(self, name))
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            _check_bool(fail, name, getattr(self, name))
        _check_token_id(fail, "pad_token_id", self.pad_token_id, self.vocab_size)
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            for token in value if isinstance(value, tuple) else (value,):
                _check_token_id(fail, name, token, self.vocab_size)
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            fail("problem_type", f"unknown problem type {_show(self.problem_type)}")
        if self.architectures is not None and not (
                isinstance(self.architectures, tuple) and all(isinstance(a, str) for a in self.architectures)):
            fail("architectures", f"must be a list of class names (strings), got {_show(self.architectures)}")
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            fail(self._spelling("torch_dtype"), f"must be a dtype name (a string) or null, got {_show(self.torch_dtype)}")
        self._validate_rope(fail)
        self._validate_family(fail)

    def _validate_rope(self, fail) -> None:
        r = self.rope_scaling
        if r is None:
            return
        key = self._spelling("rope_scaling")
        if not isinstance(r.rope_type, str) or r.rope_type not in ROPE_TYPES:
            fail(key, f"unknown rope type {_show(r.rope_type)}; supported: {', '.join(ROPE_TYPES)}")
        for name in ROPE_TYPES[r.rope_type]:
            if getattr(r, name) is None:
                fail(key, f"rope type {r.rope_type!r} needs '{name}'")
        # Every rotary parameter is finite: one NaN here makes every inv_freq NaN.
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            v = getattr(r, name)
            if v is not None and not _is_finite_number(v):
                fail(key, f"'{name}' must be a finite number, got {_show(v)}")
        if r.original_max_position_embeddings is not None:
            _check_size(lambda _, msg: fail(key, f"'original_max_position_embeddings' {msg}"),
                        "original_max_position_embeddings", r.original_max_position_embeddings)
        if r.factor is not None and r.factor < 1.0 and r.rope_type != "default":
            fail(key, f"'factor' must be >= 1, got {r.factor}")
        if r.rope_type == "dynamic" and self.resolved_head_dim <= 2:
            fail(key, "dynamic NTK scaling raises theta to the power d / (d - 2): head_dim must be > 2")
        if r.rope_type == "llama3" and not r.high_freq_factor > r.low_freq_factor > 0:
            fail(key, "llama3 needs high_freq_factor > low_freq_factor > 0, got "
                 f"{r.high_freq_factor} and {r.low_freq_factor}")
        extra = dict(r.extra)
        if extra.get("partial_rotary_factor", 1.0) not in (1, 1.0):
            fail(key, f"'partial_rotary_factor' {_show(extra['partial_rotary_factor'])} is not supported (only 1.0)")
        if "mrope_section" in extra:
            fail(key, "multimodal rotary sections ('mrope_section') are not supported")

    def _validate_family(self, fail) -> None:
        """The family and its switches (sliding windows, soft caps, experts, ...)."""

        def positive_number(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is not None:
                _check_number(fail, name, v, allow_zero=allow_zero, or_null=True)

        if not isinstance(self.model_type, str) or self.model_type not in FAMILIES:
            fail("model_type", f"unsupported model_type {_show(self.model_type)}; supported: {', '.join(FAMILIES)}")
        for name in ("hidden_activation", "activation_fallback"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or v not in ACTIVATIONS):
                fail(name, f"unknown activation {_show(v)}; supported: {', '.join(ACTIVATIONS)}")
        for name in ("qkv_bias", "use_sliding_window", "norm_unit_offset", "scale_embeddings", "sandwich_norm",
                     "norm_topk_prob", "output_router_logits"):
            _check_bool(fail, name, getattr(self, name))
        _check_size(fail, "sliding_window", self.sliding_window, allow_none=True)
        _check_size(fail, "sliding_window_pattern", self.sliding_window_pattern, allow_none=True)
        _check_size(fail, "max_window_layers", self.max_window_layers, allow_zero=True)
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple):
                fail("layer_types", f"must be a list of layer kinds, got {_show(self.layer_types)}")
            if len(self.layer_types) != self.num_hidden_layers:
                fail("layer_types", f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            bad = [t for t in self.layer_types if not isinstance(t, str) or t not in LAYER_TYPES]
            if bad:
                fail("layer_types", f"unsupported layer type {_show(bad[0])}; supported: {', '.join(LAYER_TYPES)}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            positive_number(name)
        _check_size(fail, "num_local_experts", self.num_local_experts, allow_none=True)
        _check_size(fail, "num_experts_per_tok", self.num_experts_per_tok)
        if self.is_moe and self.num_experts_per_tok > self.num_local_experts:
            fail("num_experts_per_tok", f"{self.num_experts_per_tok} experts per token but only "
                 f"{self.num_local_experts} experts (num_local_experts)")
        positive_number("router_aux_loss_coef", allow_zero=True)
        for name in ("attention_dropout", "hidden_dropout"):
            v = getattr(self, name)
            if not _is_finite_number(v) or not 0 <= v < 1:
                fail(name, f"must be a dropout probability in [0, 1), got {_show(v)}")
        if not _is_finite_number(self.router_jitter_noise) or self.router_jitter_noise != 0:
            fail("router_jitter_noise", f"router jitter noise is not implemented (only 0), got {_show(self.router_jitter_noise)}")
        extra = self.extra_dict
        for name, (allowed, why) in _UNSUPPORTED_EXTRA.items():
            if name in extra and extra[name] not in allowed:
                fail(name, f"{why}; got {_show(extra[name])}")

    def _spelling(self, name: str) -> str:
        """The key `name` had in the source config.json, or its canonical HF key."""
        return hf_config.spelling(self.source_keys, name)

    # ---- HF config.json (the spelling layer: weights.hf_config) -----------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str | None = None) -> "ModelConfig":
        """Build from a parsed HF `config.json`; absent keys take HF's defaults."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "source_keys"}
        try:
            kwargs = hf_config.fields_from_hf_dict(d, names, source)
            rope = kwargs["rope_scaling"]
            kwargs["rope_scaling"] = RopeScaling(**rope) if rope is not None else None
            cfg = cls(**kwargs)
        except ConfigError as e:
            if source is None:
                raise
            raise ConfigError(e.field, e.rule, source=source) from None
        except RecursionError:  # a mapping nested past the interpreter's limit (read_config_json bounds files)
            raise ConfigError("<root>", "nested too deep", source=source) from None
        except (TypeError, ValueError, OverflowError) as e:  # a value of a type no rule foresaw
            raise ConfigError("<root>", f"invalid value ({type(e).__name__}: {str(e)[:80]})", source=source) from None
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` mapping: modelled fields plus the unmodelled keys, unchanged.

        Keys keep the spelling of the config.json this was read from. Core fields are always
        written; family/switch fields when the source had them or they differ from the family.
        """
        return hf_config.to_hf_dict(self)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ModelConfig":
        """Read `<directory>/config.json`."""
        d, source = hf_config.read_config_json(directory)
        return cls.from_hf_dict(d, source=source)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `<directory>/config.json` atomically (temporary file, then rename)."""
        return hf_config.write_config_json(directory, self.to_hf_dict())
