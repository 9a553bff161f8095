"""Both twins read and write the same checkpoints: torch save -> flax load -> flax save -> torch
load is byte-exact, both twins write identical files, and strict loading fails alike."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import flax_impl
import torch_impl
from tests.helpers.configs import TINY
from torch_impl.layers.precision import to_dtype
from weights.checkpoint import SAFE_WEIGHTS_INDEX_NAME, CheckpointReader
from weights.convert import convert
from weights.errors import MissingKeysError, ShapeMismatchError, TiedWeightsMismatchError
from weights.names import hf_name
from weights.safetensors_writer import save_file

CONFIG = TINY.replace(pad_token_id=0)  # classification pools the last non-pad token


def torch_bits(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy().tobytes()
            for k, v in model.state_dict().items()}


def same(got: dict[str, bytes], want: dict[str, bytes]) -> bool:
    """Equal dicts of bytes; on failure pytest prints the differing names, not megabytes of diff."""
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    return True


def files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("head,tied", [("ForCausalLM", False), ("ForCausalLM", True),
                                       ("ForSequenceClassification", False), ("ForQuestionAnswering", False)])
def test_torch_flax_torch_round_trip_is_byte_exact(tmp_path, dtype, head, tied):
    config = CONFIG.replace(tie_word_embeddings=tied)
    torch.manual_seed(0)
    original = getattr(torch_impl, head)(config, dtype=to_dtype(dtype))
    original.save_pretrained(tmp_path / "torch", max_shard_size="8KB")
    flax_model = getattr(flax_impl, head).from_pretrained(tmp_path / "torch")
    flax_model.save_pretrained(tmp_path / "flax", max_shard_size="8KB")
    back = getattr(torch_impl, head).from_pretrained(tmp_path / "flax")

    assert same(torch_bits(back), torch_bits(original))
    assert same(files(tmp_path / "flax"), files(tmp_path / "torch"))  # both twins write the same bytes
    assert (tmp_path / "torch" / SAFE_WEIGHTS_INDEX_NAME).exists()
    config_json = json.loads((tmp_path / "torch" / "config.json").read_text())
    assert config_json["torch_dtype"] == dtype and config_json["architectures"] == ["Llama" + head]
    # The Flax parameters are the same bits, kernels transposed.
    for path, var in nnx.to_flat_state(nnx.state(flax_model, nnx.Param)):
        name = ".".join(map(str, path)).replace(".kernel", ".weight").replace(".embedding", ".weight")
        value = np.asarray(var[...])
        assert np.dtype(value.dtype) == np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        t = original.state_dict()[name]
        expect = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        assert (value.T if path[-1] == "kernel" else value).tobytes() == expect.tobytes()
    if tied:
        with CheckpointReader(tmp_path / "torch") as r:
            assert "lm_head.weight" not in r  # transformers leaves a tied head out too


def test_sharded_and_unsharded_load_the_same_in_both_twins(tmp_path):
    model = torch_impl.ForCausalLM(CONFIG, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size=2000)
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 5
    assert same(torch_bits(torch_impl.ForCausalLM.from_pretrained(tmp_path / "many")), torch_bits(model))
    one = flax_impl.ForCausalLM.from_pretrained(tmp_path / "one")
    many = flax_impl.ForCausalLM.from_pretrained(tmp_path / "many")
    a, b = nnx.state(one, nnx.Param), nnx.state(many, nnx.Param)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert pa == pb and np.asarray(va[...]).tobytes() == np.asarray(vb[...]).tobytes()


def test_dtype_change_on_load_is_the_same_numpy_cast_in_both_twins(tmp_path):
    model = torch_impl.ForCausalLM(CONFIG, dtype=torch.float32)
    model.save_pretrained(tmp_path / "c")
    t = torch_impl.ForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.bfloat16)
    f = flax_impl.ForCausalLM.from_pretrained(tmp_path / "c", dtype="bfloat16")
    w = model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    assert t.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    tb = t.model.layers[1].mlp.up_proj.weight.detach().view(torch.int16).numpy().tobytes()
    fb = np.ascontiguousarray(np.asarray(f.model.layers[1].mlp.up_proj.kernel[...]).T).tobytes()
    assert tb == fb == w.astype(ml_dtypes.bfloat16).tobytes()


@pytest.mark.parametrize("twin", [torch_impl, flax_impl], ids=["torch", "flax"])
def test_strict_loading_fails_alike_and_non_strict_returns_the_report(tmp_path, twin):
    torch_impl.ForCausalLM(CONFIG).save_pretrained(tmp_path / "ok")
    with pytest.raises(MissingKeysError) as info:  # a causal-LM checkpoint is not a QA one
        twin.ForQuestionAnswering.from_pretrained(tmp_path / "ok")
    assert "qa_outputs.bias" in str(info.value) and "unexpected" in str(info.value)
    assert info.value.report.unexpected == ["lm_head.weight"]
    model, report = twin.ForQuestionAnswering.from_pretrained(tmp_path / "ok", strict=False)
    assert report.unexpected == ["lm_head.weight"]
    assert sorted(report.missing) == ["qa_outputs.bias", "qa_outputs.weight"]
    CONFIG.replace(vocab_size=80).save_pretrained(tmp_path / "ok")  # config disagrees with tensors
    with pytest.raises(ShapeMismatchError) as info:
        twin.ForCausalLM.from_pretrained(tmp_path / "ok")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert f"{name}: shape mismatch: expected [80, 32] float32, found [64, 32] float32" in str(info.value)


@pytest.mark.parametrize("twin", [torch_impl, flax_impl], ids=["torch", "flax"])
def test_benign_legacy_checkpoints_load(tmp_path, twin):
    """Old QA checkpoints (`transformer.` prefix), inv_freq buffers, and a saved tied head."""
    qa = torch_impl.ForQuestionAnswering(CONFIG)
    state = {("transformer." + k[6:] if k.startswith("model.") else k): v.detach().numpy()
             for k, v in qa.state_dict().items()}
    state["transformer.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    (tmp_path / "qa").mkdir()
    CONFIG.save_pretrained(tmp_path / "qa")
    save_file(state, tmp_path / "qa" / "model.safetensors", {"format": "pt"})
    loaded = twin.ForQuestionAnswering.from_pretrained(tmp_path / "qa")
    ref = torch_bits(qa)
    got = torch_bits(torch_impl.ForQuestionAnswering.from_pretrained(tmp_path / "qa")) if twin is torch_impl else None
    assert got is None or same(got, ref)
    if twin is flax_impl:
        assert np.asarray(loaded.qa_outputs.bias[...]).tobytes() == ref["qa_outputs.bias"]

    tied = CONFIG.replace(tie_word_embeddings=True)
    lm = torch_impl.ForCausalLM(tied)
    lm_state = {k: v.detach().numpy() for k, v in lm.state_dict().items()}
    lm_state["lm_head.weight"] = lm_state["model.embed_tokens.weight"]
    (tmp_path / "tied").mkdir()
    tied.save_pretrained(tmp_path / "tied")
    save_file(lm_state, tmp_path / "tied" / "model.safetensors", {"format": "pt"})
    twin.ForCausalLM.from_pretrained(tmp_path / "tied")
    lm_state["lm_head.weight"] = lm_state["lm_head.weight"] + 1
    save_file(lm_state, tmp_path / "tied" / "model.safetensors", {"format": "pt"})
    with pytest.raises(TiedWeightsMismatchError, match="tied to model.embed_tokens.weight but differs"):
        twin.ForCausalLM.from_pretrained(tmp_path / "tied")


def test_flax_layout_checkpoint_loads_in_both_twins_and_save_keeps_other_files(tmp_path):
    model = torch_impl.ForCausalLM(CONFIG, dtype=torch.float16)
    model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "flax", layout="flax", progress=False)
    assert same(torch_bits(torch_impl.ForCausalLM.from_pretrained(tmp_path / "flax")), torch_bits(model))
    f = flax_impl.ForCausalLM.from_pretrained(tmp_path / "flax")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    f.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"
    assert same(torch_bits(torch_impl.ForCausalLM.from_pretrained(tmp_path / "hf")), torch_bits(model))


def test_missing_keys_error_in_both_twins(tmp_path):
    model = torch_impl.ForCausalLM(CONFIG)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items() if "layers.1.mlp" not in k}
    (tmp_path / "c").mkdir()
    CONFIG.save_pretrained(tmp_path / "c")
    save_file(state, tmp_path / "c" / "model.safetensors")
    for twin in (torch_impl, flax_impl):
        with pytest.raises(MissingKeysError) as info:
            twin.ForCausalLM.from_pretrained(tmp_path / "c")
        assert sorted(info.value.report.missing) == [f"model.layers.1.mlp.{p}_proj.weight"
                                                     for p in ("down", "gate", "up")]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("twin", [torch_impl, flax_impl], ids=["torch", "flax"])
def test_transformers_reads_what_we_write_and_we_read_what_it_writes(tmp_path, twin, tied):
    transformers = pytest.importorskip("transformers")
    config = CONFIG.replace(tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in config.to_hf_dict().items() if v is not None})).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="8KB")
    ours = twin.ForCausalLM.from_pretrained(tmp_path / "hf")  # strict: every tensor accounted for
    ours.save_pretrained(tmp_path / "ours")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours")
    a, b = hf.state_dict(), again.state_dict()
    assert set(a) == set(b)
    # transformers fills what a checkpoint lacks with random values (and only warns): equal bits
    # everywhere prove it found every tensor of ours.
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k].view(torch.int16), b[k].view(torch.int16))
               for k in a)


def test_repeated_flax_loads_are_identical(tmp_path):
    """Regression: jax.device_put may read its argument after the array reports ready, so host
    buffers handed to it must not be reused (a shared buffer corrupted ~1 load in 4)."""
    model = torch_impl.ForCausalLM(CONFIG, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "c", max_shard_size="8KB")
    want = torch_bits(model)
    for _ in range(6):
        f = flax_impl.ForCausalLM.from_pretrained(tmp_path / "c")
        for path, var in nnx.to_flat_state(nnx.state(f, nnx.Param)):
            name = ".".join(map(str, path)).replace(".kernel", ".weight").replace(".embedding", ".weight")
            value = np.asarray(var[...])
            assert np.ascontiguousarray(value.T if path[-1] == "kernel" else value).tobytes() == want[name]


@pytest.mark.parametrize("layout", ["hf", "flax"])
def test_load_module_fills_one_layer_as_from_pretrained_does(tmp_path, layout):
    """`load_module`, the hook of the layer-streamed check: one `DecoderLayer` built without
    memory (meta device / `nnx.eval_shape`) and filled from the checkpoint holds exactly the bits
    `from_pretrained` gives that layer, in both twins, from either on-disk layout."""
    torch.manual_seed(0)
    original = torch_impl.ForCausalLM(CONFIG, dtype=torch.bfloat16)
    original.save_pretrained(tmp_path / "hf", max_shard_size="8KB")
    if layout == "flax":
        convert(tmp_path / "hf", tmp_path / "flax", layout="flax", progress=False)
    src = tmp_path / layout
    with torch.device("meta"):
        t_layer = torch_impl.DecoderLayer(CONFIG, 1, dtype=torch.float32)
    f_layer = nnx.eval_shape(lambda: flax_impl.DecoderLayer(CONFIG, 1, dtype=np.float32, rngs=nnx.Rngs(0)))
    with CheckpointReader(src) as reader:
        t_layer = torch_impl.checkpoint.load_module(
            t_layer, reader, {n: f"model.layers.1.{n}" for n in t_layer.state_dict()})
        f_names = {hf_name(p): f"model.layers.1.{hf_name(p)}" for p, _ in nnx.to_flat_state(nnx.state(f_layer, nnx.Param))}
        f_layer = flax_impl.checkpoint.load_module(f_layer, reader, f_names)
        with pytest.raises(KeyError, match="input_layernorm"):
            torch_impl.checkpoint.load_module(torch_impl.DecoderLayer(CONFIG, 1), reader, {})
    t_whole = torch_impl.ForCausalLM.from_pretrained(src, dtype="float32").model.layers[1]
    assert same(torch_bits(t_layer), torch_bits(t_whole))
    f_whole = flax_impl.ForCausalLM.from_pretrained(src, dtype="float32").model.layers[1]
    f_state = dict(nnx.to_flat_state(nnx.state(f_layer, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(f_whole, nnx.Param)):
        assert np.asarray(f_state[path].get_value()).tobytes() == np.asarray(var.get_value()).tobytes(), path
