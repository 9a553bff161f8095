"""Model families (llama 2/3, mistral, qwen2, gemma, gemma2, mixtral) are
switches of one architecture, set from `config.json`'s `model_type`, in both twins.

Per family: forward parity of the three heads (float64 and float32 per the table),
gradient parity of every parameter, KV-cache decoding equal to the full pass in both twins
(windows shorter than the sequence), config.json round trips keeping every key, and a
checkpoint written in the HF layout — HF's tensor names and config keys, spelled out below
from the HF modeling files, independently of twinlm's code — that loads, runs and saves.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_impl
import torch_impl
from flax_impl.checkpoint import load_numpy_state as flax_load
from parity import strategies as tst
from parity.compare import to_numpy
from parity.inputs import HEADS
from tests.helpers.twins import assert_close, batch, decode_matches_full_pass, randomized_pair, run_flax, run_torch
from torch_impl.checkpoint import load_numpy_state as torch_load
from weights.config import ConfigError, ModelConfig
from weights.names import hf_name, is_transposed
from weights import load_file, save_file

EXAMPLES = tst.family_examples()


# ---- helpers -------------------------------------------------------------------------------
def head_kwargs(head: str, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if head == "causal_lm":
        return {"labels": x["labels"]}
    if head == "sequence_classification":
        return {"labels": x["class_labels"]}
    return {"start_positions": x["start_positions"], "end_positions": x["end_positions"]}


def flax_grads_by_hf_name(grads: nnx.State) -> dict[str, np.ndarray]:
    """nnx gradient state -> HF-named numpy arrays in HF layout (kernels transposed back)."""
    out = {}
    for path, v in nnx.to_flat_state(grads):
        name = hf_name(path)
        a = to_numpy(v[...])
        out[name] = a.T if is_transposed(name) else a
    return out


# ---- forward, gradients, decoding --------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_forward_parity(family, dtype):
    """All three heads: every hidden state, the logits and the loss (the aux loss with experts)."""
    config = EXAMPLES[family]
    x = batch(config)
    for head in sorted(HEADS):
        t_model, f_model = randomized_pair(config, head, dtype)
        inputs = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], **head_kwargs(head, x)}
        t_out = run_torch(t_model, inputs, output_hidden_states=True)
        f_out = run_flax(f_model, inputs, output_hidden_states=True)
        for i, (a, b) in enumerate(zip(t_out.hidden_states, f_out.hidden_states)):
            assert_close(f"{head} hidden_states[{i}]", a, b, dtype)
        for field in ("logits", "start_logits", "end_logits"):
            if hasattr(t_out, field):
                assert_close(f"{head} {field}", getattr(t_out, field), getattr(f_out, field), dtype, "logits")
        assert_close(f"{head} loss", t_out.loss, f_out.loss, dtype, "loss")
        if head == "causal_lm" and config.is_moe and config.output_router_logits:
            assert_close("aux_loss", t_out.aux_loss, f_out.aux_loss, dtype, "loss")


def test_gemma_casts_follow_hf_in_bfloat16():
    """Gemma's two cast orders, exactly, in both twins: the norm multiplies by (1 + w) in float32
    and casts after (LLaMA casts before multiplying by w), and the embedding scale sqrt(E) is
    rounded to the activation dtype before the multiply (E = 24: 4.899 -> 4.906 in bfloat16)."""
    config = ModelConfig.for_family("gemma", vocab_size=16, hidden_size=24, intermediate_size=8,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    t_model, f_model = randomized_pair(config, "DecoderModel", "bfloat16")
    ids = np.arange(12).reshape(2, 6)
    normalizer = torch.tensor(24 ** 0.5, dtype=torch.bfloat16)
    expected = t_model.embed_tokens(torch.from_numpy(ids)) * normalizer
    assert not torch.equal(expected, (t_model.embed_tokens(torch.from_numpy(ids)).float() * 24 ** 0.5).bfloat16())
    for out in (run_torch(t_model, {"input_ids": ids}, output_hidden_states=True),
                run_flax(f_model, {"input_ids": ids}, output_hidden_states=True)):
        np.testing.assert_array_equal(to_numpy(out.hidden_states[0]), to_numpy(expected))
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(0)).bfloat16()
    w = t_model.norm.weight
    xf = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    gemma_order = (xf * (1.0 + w.float())).bfloat16()
    assert not torch.equal(gemma_order, (1.0 + w) * xf.bfloat16())  # the order is visible in bf16
    np.testing.assert_array_equal(to_numpy(t_model.norm(x)), to_numpy(gemma_order))
    np.testing.assert_array_equal(to_numpy(f_model.norm(jnp.asarray(to_numpy(x), jnp.bfloat16))), to_numpy(gemma_order))


@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_gradient_parity(family):
    config = EXAMPLES[family]
    t_model, f_model = randomized_pair(config, "causal_lm", "float64")
    x = batch(config)
    inputs = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "labels": x["labels"]}
    run_torch(t_model, inputs).loss.backward()
    f_grads = flax_grads_by_hf_name(nnx.grad(lambda m: run_flax(m, inputs).loss)(f_model))
    t_grads = {n: p.grad for n, p in t_model.named_parameters()}
    assert set(t_grads) == set(f_grads)
    for name, g in t_grads.items():
        assert g is not None, f"{name}: no gradient in the torch twin"
        assert_close(f"grad {name}", g, f_grads[name], "float64", "gradients")


@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_cached_decoding_equals_full_pass(family):
    config = EXAMPLES[family]
    if any(w is not None for w in config.layer_windows):
        assert 9 > max(w for w in config.layer_windows if w is not None) + 1  # decoding runs past the window
    decode_matches_full_pass(config)


# ---- config.json ---------------------------------------------------------------------------
# config.json files as the hub holds them (key sets of meta-llama/Llama-2-7b-hf,
# mistralai/Mistral-7B-v0.1, Qwen/Qwen2-0.5B, google/gemma-2b, google/gemma-2-2b,
# mistralai/Mixtral-8x7B-v0.1), and transformers 5.x spellings (dtype, rope_parameters).
HF_CONFIGS = {
    "llama2": {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
               "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
               "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
               "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
               "rope_scaling": {"type": "linear", "factor": 2.0}, "tie_word_embeddings": False,
               "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000},
    "mistral": {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
                "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
                "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
                "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
              "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
              "intermediate_size": 4864, "max_position_embeddings": 131072, "max_window_layers": 24,
              "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
              "use_sliding_window": False, "vocab_size": 151936},
    "gemma": {"architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048,
              "initializer_range": 0.02, "intermediate_size": 16384, "max_position_embeddings": 8192,
              "model_type": "gemma", "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
              "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
              "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0", "use_cache": True, "vocab_size": 256000},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
               "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
               "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
               "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
               "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2",
               "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
               "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
               "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
                "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
                "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
                "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
                "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
                "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000},
    "llama3-transformers5": {"architectures": ["LlamaForCausalLM"], "dtype": "bfloat16", "model_type": "llama",
                             "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
                                                 "rope_type": "llama3"},
                             "num_key_value_heads": 8, "transformers_version": "5.0.0"},
    "qwen2-layer-types": {"model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": True,
                          "sliding_window": 8, "max_window_layers": 2,
                          "layer_types": ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]},
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_config_round_trip_keeps_every_key(name, tmp_path):
    d = HF_CONFIGS[name]
    cfg = ModelConfig.from_hf_dict(d)
    out = cfg.to_hf_dict()
    for key, value in d.items():
        assert key in out, f"{name}: {key} lost"
        assert out[key] == value and type(out[key]) is type(value), f"{name}: {key}: {value!r} -> {out[key]!r}"
    assert ModelConfig.from_hf_dict(out) == cfg
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg.save_pretrained(tmp_path / "again")
    assert ModelConfig.from_pretrained(tmp_path / "again") == ModelConfig.from_pretrained(tmp_path) == cfg


def test_family_semantics_of_real_configs():
    gemma = ModelConfig.from_hf_dict(HF_CONFIGS["gemma"])
    # GemmaConfig ties embeddings when the key is absent; GemmaMLP ignores hidden_act ("gelu")
    # and falls back to the tanh GELU when hidden_activation is missing.
    assert gemma.tie_word_embeddings and gemma.mlp_activation == "gelu_pytorch_tanh"
    assert gemma.norm_unit_offset and gemma.scale_embeddings and gemma.resolved_head_dim == 256
    qwen = ModelConfig.from_hf_dict(HF_CONFIGS["qwen2"])
    assert qwen.attention_qkv_bias and not qwen.attention_bias and qwen.layer_windows == (None,) * 24
    assert ModelConfig.from_hf_dict({**HF_CONFIGS["qwen2"], "use_sliding_window": True}).layer_windows \
        == (None,) * 24  # max_window_layers 24 of 24: every layer stays global
    assert ModelConfig.from_hf_dict(HF_CONFIGS["qwen2-layer-types"]).layer_windows == (None, None, 8, 8)
    gemma2 = ModelConfig.from_hf_dict(HF_CONFIGS["gemma2"])
    assert gemma2.layer_windows[:4] == (4096, None, 4096, None) and gemma2.sandwich_norm
    assert gemma2.query_scaling == 256 ** -0.5
    assert ModelConfig.from_hf_dict(HF_CONFIGS["mistral"]).layer_windows == (4096,) * 32
    mixtral = ModelConfig.from_hf_dict(HF_CONFIGS["mixtral"])
    assert mixtral.is_moe and mixtral.norm_topk_prob and mixtral.layer_windows == (None,) * 32
    # A family's own switches are not written back into another family's config.json.
    assert not {"sandwich_norm", "norm_unit_offset", "num_local_experts", "qkv_bias"} & set(
        ModelConfig.from_hf_dict(HF_CONFIGS["llama2"]).to_hf_dict())


@pytest.mark.parametrize("changes, field", [
    ({"model_type": "phi3"}, "model_type"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}}, "rope_parameters"),
    ({"attention_dropout": 1.0}, "attention_dropout"),
    ({"hidden_dropout": -0.1}, "hidden_dropout"),
    ({"model_type": "mixtral", "router_jitter_noise": 0.01}, "router_jitter_noise"),
    ({"model_type": "mixtral", "num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"model_type": "gemma2", "layer_types": ["chunked_attention"] * 32}, "layer_types"),
    ({"model_type": "gemma2", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"model_type": "gemma2", "attn_logit_softcapping": -1.0}, "attn_logit_softcapping"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window"),
])
def test_unsupported_switch_refused_at_load(changes, field, tmp_path):
    d = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 32, **changes}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_pretrained(tmp_path)
    assert err.value.field == field and str(tmp_path) in str(err.value)


# ---- checkpoints in the HF layout ----------------------------------------------------------
def hf_tensor_shapes(model_type: str, c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes HF's `*ForCausalLM` state dict has, per family, written from
    the HF modeling files (not from twinlm's code): modeling_llama (q/k/v/o biases with
    attention_bias, gate/up/down biases with mlp_bias), modeling_qwen2 (q/k/v biases, no o
    bias), modeling_gemma / modeling_gemma2 (tied head, gemma2's pre_/post_feedforward_layernorm),
    modeling_mixtral (`block_sparse_moe.gate`, `experts.{j}.w1/w2/w3`, no biases)."""
    e, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    h = c.num_attention_heads
    k, d = c.num_key_value_heads or h, c.head_dim or e // h
    s = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        for proj, shape in (("q", (h * d, e)), ("k", (k * d, e)), ("v", (k * d, e)), ("o", (e, h * d))):
            s[f"{p}self_attn.{proj}_proj.weight"] = shape
            if (model_type in ("llama", "gemma") and c.attention_bias) or (model_type == "qwen2" and proj != "o"):
                s[f"{p}self_attn.{proj}_proj.bias"] = shape[:1]
        if model_type == "mixtral":
            s[f"{p}block_sparse_moe.gate.weight"] = (c.num_local_experts, e)
            for j in range(c.num_local_experts):
                for w, shape in (("w1", (i, e)), ("w2", (e, i)), ("w3", (i, e))):
                    s[f"{p}block_sparse_moe.experts.{j}.{w}.weight"] = shape
        else:
            for proj, shape in (("gate", (i, e)), ("up", (i, e)), ("down", (e, i))):
                s[f"{p}mlp.{proj}_proj.weight"] = shape
                if model_type == "llama" and c.mlp_bias:
                    s[f"{p}mlp.{proj}_proj.bias"] = shape[:1]
        norms = ["input_layernorm", "post_attention_layernorm"]
        if model_type == "gemma2":
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for norm in norms:
            s[f"{p}{norm}.weight"] = (e,)
    if not c.tie_word_embeddings:
        s["lm_head.weight"] = (v, e)
    return s


HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "mixtral": "MixtralForCausalLM"}

# Tiny configs spelled with HF config keys only, as the hub would hold them.
HF_TINY = {
    "llama": {"model_type": "llama", "attention_bias": True, "mlp_bias": True,
              "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 6},
    "mistral": {"model_type": "mistral", "sliding_window": 3},
    "qwen2": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1,
              "tie_word_embeddings": True},
    "gemma": {"model_type": "gemma", "hidden_act": "gelu", "pad_token_id": 0},
    "gemma2": {"model_type": "gemma2", "query_pre_attn_scalar": 6, "sliding_window": 3,
               "attn_logit_softcapping": 1.5, "final_logit_softcapping": 2.0},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4,
                "output_router_logits": True, "router_aux_loss_coef": 0.1},
}


@pytest.mark.parametrize("model_type", sorted(HF_TINY))
def test_hf_layout_checkpoint_loads_runs_and_saves(model_type, tmp_path):
    # head_dim 8 != 16 / 4: every family's current HF attention reads `head_dim` from the config.
    d = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "architectures": [HF_CLASS[model_type]],
         **HF_TINY[model_type]}
    (tmp_path / "config.json").write_text(json.dumps(d))
    config = ModelConfig.from_pretrained(tmp_path)
    shapes = hf_tensor_shapes(model_type, config)
    rng = np.random.default_rng(0)
    tensors = {n: (rng.standard_normal(s) * (0.3 if len(s) == 1 else 0.2)).astype(np.float32) for n, s in shapes.items()}
    save_file(tensors, tmp_path / "model.safetensors")

    t_model = torch_impl.ForCausalLM.from_pretrained(tmp_path, dtype="float64")
    f_model = flax_impl.ForCausalLM.from_pretrained(tmp_path, dtype="float64")
    x = batch(config)
    inputs = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "labels": x["labels"]}
    assert_close("logits", run_torch(t_model, inputs).logits, run_flax(f_model, inputs).logits, "float64", "logits")

    # The low-level loaders are strict too: the HF names are exactly the twins' parameters.
    torch_load(torch_impl.ForCausalLM(config, dtype=torch.float32), tensors)
    flax_load(flax_impl.ForCausalLM(config, rngs=nnx.Rngs(0)), tensors)
    for label, model in (("torch", t_model), ("flax", f_model)):
        model.save_pretrained(tmp_path / label)
        saved = load_file(next((tmp_path / label).glob("*.safetensors")))
        assert set(saved) == set(shapes), label
        for name, a in saved.items():
            np.testing.assert_array_equal(np.asarray(a, np.float32), tensors[name], err_msg=f"{label}: {name}")
        written = json.loads((tmp_path / label / "config.json").read_text())
        assert all(written[k] == v for k, v in d.items() if k != "architectures"), label
        assert written["architectures"] == [HF_CLASS[model_type]]
