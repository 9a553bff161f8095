"""Model families: each one is a set of `ModelConfig` field values, keyed by HF `model_type`.

This table is the only place a family is defined. `ModelConfig.from_hf_dict` starts from the
family's values and lets the keys of `config.json` override them, so:

- a key absent from `config.json` takes the default of that family's HF config class
  (`GemmaConfig` ties embeddings, `MistralConfig` has a 4096-token window, ...);
- switches that HF hard-codes in a family's modeling file rather than reading from the config
  (Gemma's `1 + weight` norm, Qwen2's q/k/v-only bias, Gemma 2's sandwich norms, ...) are set
  here too, and are written back to `config.json` only when they differ from the family's value.

Layers never test `model_type`; they read the switches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FAMILIES", "Family", "LAYER_TYPES"]

# Per-layer attention kinds of HF `layer_types` that the twins implement.
LAYER_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Family:
    """One HF model family: its class-name prefix and the field values that define it."""

    class_prefix: str  # HF class names are f"{class_prefix}ForCausalLM", ...
    values: dict[str, Any] = field(default_factory=dict)  # ModelConfig field -> value for this family


_GEMMA_SHARED = {
    # GemmaConfig / Gemma2Config defaults that differ from LlamaConfig's.
    "vocab_size": 256000, "head_dim": 256, "max_position_embeddings": 8192, "pad_token_id": 0,
    "bos_token_id": 2, "eos_token_id": 1, "tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh",
    # Hard-coded in modeling_gemma*.py: (1 + w) norm, sqrt(E)-scaled embeddings, and the tanh GELU
    # when `hidden_activation` is null (GemmaMLP ignores `hidden_act`).
    "norm_unit_offset": True, "scale_embeddings": True, "activation_fallback": "gelu_pytorch_tanh",
}

FAMILIES: dict[str, Family] = {
    # LlamaConfig's defaults are ModelConfig's own defaults.
    "llama": Family("Llama"),
    "mistral": Family("Mistral", {
        "intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096, "use_sliding_window": True,  # every layer slides when a window is set
    }),
    "mixtral": Family("Mixtral", {
        "intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "use_sliding_window": True, "num_local_experts": 8,
    }),
    "qwen2": Family("Qwen2", {
        "vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768,
        "bos_token_id": None, "eos_token_id": None,
        "qkv_bias": True,  # Qwen2Attention: bias on q/k/v, none on o
        "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28,
    }),
    "gemma": Family("Gemma", {
        **_GEMMA_SHARED, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 16,
    }),
    "gemma2": Family("Gemma2", {
        **_GEMMA_SHARED, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "sliding_window": 4096, "use_sliding_window": True,
        "sliding_window_pattern": 2,  # layers 0, 2, 4, ... slide; 1, 3, 5, ... are global
        "sandwich_norm": True,
    }),
}
