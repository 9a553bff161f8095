"""ModelConfig: HF config.json round trips, both transformers spellings, and every validation rule."""

import json

import pytest

from weights.config import ConfigError, ModelConfig, RopeScaling

LLAMA3_8B = {  # the shape of meta-llama/Meta-Llama-3.1-8B's config.json (transformers 4.x)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def test_reads_llama3_config_and_keeps_unmodelled_keys():
    cfg = ModelConfig.from_hf_dict(LLAMA3_8B)
    assert cfg.num_key_value_groups == 4 and cfg.resolved_head_dim == 128
    assert cfg.rope.rope_type == "llama3" and cfg.rope.original_max_position_embeddings == 8192
    assert cfg.eos_token_id == (128001, 128008, 128009)
    out = cfg.to_hf_dict()
    for key in ("pretraining_tp", "attention_dropout", "transformers_version", "use_cache"):
        assert out[key] == LLAMA3_8B[key]
    assert ModelConfig.from_hf_dict(out) == cfg


def test_defaults_are_hf_defaults_when_keys_are_absent():
    cfg = ModelConfig.from_hf_dict({})
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (32000, 4096, 11008, 32)
    assert cfg.resolved_num_key_value_heads == 32 and cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 10000.0
    assert cfg.rope_scaling is None and cfg.hidden_act == "silu" and cfg.max_position_embeddings == 2048


def test_transformers_5_spellings():
    d = {"hidden_size": 64, "num_attention_heads": 4, "dtype": "bfloat16",
         "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0}}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.torch_dtype == "bfloat16" and cfg.rope_theta == 1234.0
    assert cfg.rope.rope_type == "linear" and cfg.rope.factor == 2.0


def test_transformers_4_type_key():
    cfg = ModelConfig.from_hf_dict({"rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert cfg.rope.rope_type == "dynamic"


def test_save_and_load(tmp_path):
    cfg = ModelConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, rope_scaling=RopeScaling("linear", 4.0))
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_scaling"]["factor"] == 4.0
    assert ModelConfig.from_pretrained(tmp_path) == cfg
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("changes, field", [
    ({"hidden_size": 0}, "hidden_size"),
    ({"vocab_size": -3}, "vocab_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"intermediate_size": 1.5}, "intermediate_size"),
    ({"hidden_size": 66, "num_attention_heads": 4}, "num_attention_heads"),  # 4 does not divide 66
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"head_dim": 7}, "head_dim"),  # rotary needs an even head dim
    ({"hidden_act": "swiglu2"}, "hidden_act"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),  # unknown type
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling"),  # missing factor
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192}}, "rope_scaling"),
    ({"hidden_size": 8, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),  # d=2
    ({"pad_token_id": 10**9}, "pad_token_id"),
    ({"problem_type": "ranking"}, "problem_type"),
])
def test_invalid_config_names_the_field(changes, field):
    base = {"vocab_size": 100, "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf_dict({**base, **changes}, source="ckpt/config.json")
    assert err.value.field == field
    assert f"'{field}'" in str(err.value) and "ckpt/config.json" in str(err.value)


def test_explicit_head_dim_lifts_the_divisibility_rule():
    cfg = ModelConfig(hidden_size=66, num_attention_heads=4, head_dim=16)
    assert cfg.resolved_head_dim == 16


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_pretrained(tmp_path)


def test_config_is_hashable_for_jit():
    a = ModelConfig.from_hf_dict(LLAMA3_8B)
    assert hash(a) == hash(ModelConfig.from_hf_dict(dict(LLAMA3_8B)))


def test_dropout_rates_are_fields_read_and_written_back():
    cfg = ModelConfig.from_hf_dict({**LLAMA3_8B, "attention_dropout": 0.1})
    assert cfg.attention_dropout == 0.1 and cfg.hidden_dropout == 0.0
    out = cfg.to_hf_dict()
    assert out["attention_dropout"] == 0.1 and "hidden_dropout" not in out  # twinlm's own, written when set
    assert ModelConfig.from_hf_dict({**out, "hidden_dropout": 0.2}).hidden_dropout == 0.2
