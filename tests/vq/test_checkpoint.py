"""Transformer-VQ config and checkpoints: validation, config.json round trip, safetensors save /
load across the twins (bit-exact), and the importer from the reference's Flax parameter tree."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch

import torch_impl.vq as T
from flax_impl.vq import checkpoint as fckpt
from parity.vq.pairs import random_params
from parity.vq.strategies import fixture_config
from torch_impl.vq import checkpoint as tckpt
from weights.config import ConfigError
from weights.vq.checkpoint import CheckpointError, import_reference_params, load_vq_checkpoint
from weights.vq.config import TransformerVQConfig


# ---- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, rule", [
    ("mem_len", 0, "positive integer"),
    ("block_len", 5, "does not divide update_len"),
    ("update_len", 8, "does not divide sequence_len"),
    ("d_model", 7, "even width"),
    ("dtype", "float8", "unknown dtype"),
    ("p_dropres", 1.0, "probability"),
    ("c_gamma", 1.5, "[0, 1]"),
    ("agg_cache", 1, "boolean"),
    ("model_type", "llama", "transformer_vq"),
])
def test_config_rejects(field, value, rule):
    with pytest.raises(ConfigError) as err:
        fixture_config(**{field: value})
    assert err.value.field == field and rule in str(err.value)


def test_config_json_round_trip(tmp_path):
    config = fixture_config(e_scale=0.005, p_dropsin=0.1)
    path = config.save_pretrained(tmp_path)
    d = json.loads(path.read_text())
    assert d["model_type"] == "transformer_vq" and d["mem_len"] == 3
    assert TransformerVQConfig.from_pretrained(tmp_path) == config
    d["not_a_field"] = 1
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="not_a_field"):
        TransformerVQConfig.from_pretrained(tmp_path)


def test_block_len_must_divide_the_call():
    config = fixture_config()
    model = T.Transformer(config)
    with pytest.raises(ConfigError, match="does not divide"):
        model(torch.zeros(1, 12, dtype=torch.int64), T.Transformer.initial_state(config, 1), None,
              block_len=5, is_train=False)


# ---- save / load -----------------------------------------------------------------------------
def _bits(a):
    a = np.asarray(a)
    return a.reshape(-1).view(np.uint8)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_save_load_round_trip_is_bit_exact_across_twins(tmp_path, dtype):
    config = fixture_config(param_dtype=dtype, dtype=dtype, e_tie=False)
    params = random_params(config.replace(param_dtype="float32", dtype="float32"), 0)
    t_model = tckpt.load_numpy(tckpt.abstract_model(config), params)
    want = tckpt.to_numpy(t_model)
    tckpt.save_pretrained(t_model, tmp_path / "from_torch")
    f_model = fckpt.from_pretrained(tmp_path / "from_torch")
    got = fckpt.to_numpy(f_model)
    fckpt.save_pretrained(f_model, tmp_path / "from_flax")
    back = tckpt.to_numpy(tckpt.from_pretrained(tmp_path / "from_flax"))
    assert sorted(got) == sorted(want) == sorted(back)
    for name in want:
        assert want[name].dtype == got[name].dtype == back[name].dtype
        if dtype == "bfloat16":  # the ScaledSin scale is at least float32 (the reference's float32, never a downcast)
            assert want[name].dtype == (np.float32 if name.endswith("scale") else ml_dtypes.bfloat16)
        assert want[name].shape == got[name].shape
        np.testing.assert_array_equal(_bits(got[name]), _bits(want[name]), err_msg=name)
        np.testing.assert_array_equal(_bits(back[name]), _bits(want[name]), err_msg=name)
    assert fckpt.to_numpy(f_model)["position_embedder.scale"].shape == ()


def test_load_rejects_missing_and_misshaped_tensors(tmp_path):
    config = fixture_config()
    params = random_params(config, 0)
    tckpt.save_pretrained(tckpt.load_numpy(tckpt.abstract_model(config), params), tmp_path)
    _, tensors = load_vq_checkpoint(tmp_path)
    del tensors["out_ln.g"]
    with pytest.raises(CheckpointError, match="missing tensors .*out_ln.g"):
        fckpt.load_numpy(fckpt.abstract_model(config), tensors)
    tensors = dict(params, **{"out_ln.g": np.ones(3)})
    with pytest.raises(CheckpointError, match="out_ln.g.*shape"):
        tckpt.load_numpy(tckpt.abstract_model(config), tensors)


# ---- the reference's parameter tree ----------------------------------------------------------
def reference_tree(p, config):
    """The official Flax tree (spec §6.2), written out by hand: Dense kernels are [in, out]."""
    tree = {"token_embedder": {"embs": p["token_embedder.embs"], "bias_out": p["token_embedder.bias_out"]},
            "position_embedder": {"scale": p["position_embedder.scale"]},
            "out_ln": {"g": p["out_ln.g"], "b": p["out_ln.b"]}}
    for i in range(config.n_layer):
        layer = {}
        for j in (1, 2):
            q = f"transformer_layers.{i}.scanned_attn{j}."
            layer[f"scanned_attn{j}"] = {
                "input_ln": {"g": p[q + "input_ln.g"], "b": p[q + "input_ln.b"]},
                "q_proj": {"kernel": p[q + "q_proj.weight"].T},
                "kvg_proj": {"kernel": p[q + "kvg_proj.weight"].T},
                "r_proj": {"kernel": p[q + "r_proj.weight"].T},
                "res_proj": {"kernel": p[q + "res_proj.weight"].T},
                "u": p[q + "u"], "v": p[q + "v"],
                "quantizer": {"c_sum": p[q + "quantizer.c_sum"], "c_count": p[q + "quantizer.c_count"]},
            }
        tree[f"transformer_layers_{i}"] = layer
    return {"params": tree}


def test_reference_tree_imports_into_both_twins():
    config = fixture_config()
    params = random_params(config, 9)
    tree = reference_tree(params, config)
    imported = import_reference_params(tree, config)
    assert sorted(imported) == sorted(params)
    for name in params:
        np.testing.assert_array_equal(imported[name], params[name], err_msg=name)
    t_model = tckpt.from_reference_params(tree, config)
    f_model = fckpt.from_reference_params(tree, config)
    for got in (tckpt.to_numpy(t_model), fckpt.to_numpy(f_model)):
        for name in params:
            np.testing.assert_array_equal(got[name], params[name], err_msg=name)
    # kvg is cut k | v | g at H*d_k and H*(d_k + d_v), head-major (the reference's layout): the torch twin's keys
    # are the first H*d_k output channels of the reference kernel.
    kernel = tree["params"]["transformer_layers_0"]["scanned_attn1"]["kvg_proj"]["kernel"]
    x = torch.tensor(np.random.default_rng(0).standard_normal((1, 2, config.d_model)))
    with torch.no_grad():
        k, _, _ = t_model.transformer_layers[0].scanned_attn1.get_kvg(x)
    raw_k = (x.numpy() @ kernel)[..., :config.n_head * config.d_k].reshape(1, 2, config.n_head, config.d_k)
    from parity.vq.reference import rms_norm
    np.testing.assert_allclose(k.numpy(), rms_norm(raw_k).transpose(0, 2, 1, 3) * config.d_k ** -0.25, atol=1e-12)
    with pytest.raises(CheckpointError, match="missing"):
        del tree["params"]["out_ln"]
        import_reference_params(tree, config)


def test_truncated_weights_file_is_a_checkpoint_error_and_save_is_atomic(tmp_path):
    config = fixture_config()
    model = tckpt.load_numpy(tckpt.abstract_model(config), random_params(config, 0))
    tckpt.save_pretrained(model, tmp_path)
    path = tmp_path / "model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp left
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        fckpt.from_pretrained(tmp_path)
