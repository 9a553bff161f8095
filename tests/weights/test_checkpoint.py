"""Checkpoint directories: sharded and single-file checkpoints read the same, shards and index
are named as transformers names them, index problems are reported precisely, writes are atomic."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from tests.helpers.configs import TINY
from weights.checkpoint import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, CheckpointReader, ShardedWriter,
                                atomic_directory, parse_size, plan_shards)
from weights.config import ConfigError, ModelConfig
from weights.errors import (CheckpointNotFoundError, DestinationExistsError, PickleRefusedError,
                            SafetensorsFormatError, ShardIndexError)
from weights.names import hf_shapes
from weights.safetensors_io import TensorSpec, load_file
from weights.safetensors_writer import save_file
from weights.synthetic import write_synthetic_checkpoint

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
def test_sharded_and_single_file_checkpoints_read_the_same(tmp_path, dtype):
    write_synthetic_checkpoint(tmp_path / "one", TINY, dtype=dtype)
    write_synthetic_checkpoint(tmp_path / "many", TINY, dtype=dtype, max_shard_size="4KB")
    with CheckpointReader(tmp_path / "one") as one, CheckpointReader(tmp_path / "many") as many:
        assert len(many.files) > 2 and len(one.files) == 1
        assert sorted(one.keys()) == sorted(many.keys()) == sorted(hf_shapes(TINY))
        for k in one.keys():
            assert one.dtype(k) == many.dtype(k) == np.dtype(dtype)
            assert one.get(k).tobytes() == many.get(k).tobytes()


def test_shards_and_index_are_named_like_transformers(tmp_path):
    write_synthetic_checkpoint(tmp_path / "c", TINY, dtype=BF16, max_shard_size=10_000)
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    n = len(files) - 2
    assert files == ["config.json", *[f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)],
                     SAFE_WEIGHTS_INDEX_NAME]
    text = (tmp_path / "c" / SAFE_WEIGHTS_INDEX_NAME).read_text()
    index = json.loads(text)
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == sum(np.prod(s) * 2 for s in hf_shapes(TINY).values())
    for name, shard in index["weight_map"].items():
        assert name in load_file(tmp_path / "c" / shard)
    for shard in set(index["weight_map"].values()):
        with open(tmp_path / "c" / shard, "rb") as f:
            assert b'"__metadata__":{"format":"pt"}' in f.read(4096)  # transformers checks this


def test_plan_shards_follows_huggingface_hub():
    # huggingface_hub's own example: in order; a tensor above the limit is a shard of its own,
    # emitted at once; a tensor that would tip the open shard over starts a new one.
    sizes = {"layer_1": 6, "layer_2": 10, "layer_3": 30, "layer_4": 2, "layer_5": 2}
    specs = [TensorSpec(k, (n,), np.dtype(np.uint8)) for k, n in sizes.items()]
    plan = plan_shards(specs, 10, "file.dummy")
    assert [(f, [s.name for s in g]) for f, g in plan] == [
        ("file-00001-of-00004.dummy", ["layer_1"]), ("file-00002-of-00004.dummy", ["layer_3"]),
        ("file-00003-of-00004.dummy", ["layer_2"]), ("file-00004-of-00004.dummy", ["layer_4", "layer_5"])]
    assert plan_shards(specs, 100) == [(SAFE_WEIGHTS_NAME, specs)]
    assert plan_shards(specs, None) == [(SAFE_WEIGHTS_NAME, specs)]
    assert plan_shards([], "5GB") == [(SAFE_WEIGHTS_NAME, [])]


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                        ("10KB", 10_000), (1234, 1234), ("1234", 1234), ("8Gb", 10**9),
                                        ("1.5GB", 1_500_000_000), (" 3 MB ", 3 * 10**6), ("8mb", 10**6)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "GB", "5XB", "-1GB", 0, "five"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(bad)


# ---- the index against its shards ------------------------------------------------------------
@pytest.fixture()
def sharded(tmp_path):
    d = write_synthetic_checkpoint(tmp_path / "c", TINY, dtype=np.float16, max_shard_size="4KB")
    index = json.loads((d / SAFE_WEIGHTS_INDEX_NAME).read_text())
    return d, index


def _write_index(d, index):
    (d / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))


def test_index_naming_a_missing_shard(sharded):
    d, index = sharded
    shard = index["weight_map"]["model.norm.weight"]
    (d / shard).unlink()
    with pytest.raises(ShardIndexError, match="missing shard") as info:
        CheckpointReader(d)
    assert shard in str(info.value) and SAFE_WEIGHTS_INDEX_NAME in str(info.value)


def test_index_naming_a_tensor_missing_from_its_shard(sharded):
    d, index = sharded
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = index["weight_map"]["model.norm.weight"]
    _write_index(d, index)
    with pytest.raises(ShardIndexError, match="missing from their shard") as info:
        CheckpointReader(d)
    assert info.value.tensor == "model.layers.7.mlp.up_proj.weight"


def test_shard_holding_a_tensor_the_index_does_not_list(sharded):
    d, index = sharded
    del index["weight_map"]["model.norm.weight"]
    _write_index(d, index)
    with pytest.raises(ShardIndexError, match="does not assign") as info:
        CheckpointReader(d)
    assert info.value.tensor == "model.norm.weight"


@pytest.mark.parametrize("content,words", [("{not json", "not valid JSON"), ("[]", "weight_map"),
                                           ('{"weight_map": {"a": 3}}', "weight_map"),
                                           ('{"weight_map": {"a": "../model.safetensors"}}', "file name")])
def test_invalid_index(sharded, content, words):
    d, _ = sharded
    (d / SAFE_WEIGHTS_INDEX_NAME).write_text(content)
    with pytest.raises(ShardIndexError, match=words):
        CheckpointReader(d)


def test_corrupt_shard_names_the_shard(sharded):
    d, index = sharded
    shard = d / index["weight_map"]["model.norm.weight"]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(SafetensorsFormatError) as info:
        CheckpointReader(d)
    assert info.value.file == str(shard)


def test_no_weights_and_pickle_only_directories(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        CheckpointReader(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="no weights found"):
        CheckpointReader(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(PickleRefusedError, match="pytorch_model.bin"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("content,field", [(None, "<file>"), ("{oops", "<file>"), ("[1]", "<root>"),
                                           ('{"hidden_size": 30, "num_attention_heads": 4}', "num_attention_heads")])
def test_config_missing_or_invalid(tmp_path, content, field):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_pretrained(tmp_path)
    assert info.value.field == field and "config.json" in str(info.value)


# ---- atomic writes ---------------------------------------------------------------------------
def test_sharded_writer_failure_leaves_nothing(tmp_path):
    specs = [TensorSpec("a", (1000,), np.dtype(np.float32)), TensorSpec("b", (1000,), np.dtype(np.float32))]
    with pytest.raises(KeyboardInterrupt):
        with ShardedWriter(tmp_path / "out", specs, max_shard_size=4000) as w:
            w.write("a", np.zeros(1000, np.float32))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_only_with_force_and_keeps_what_is_asked(tmp_path):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "tokenizer.json").write_text("tok")
    save_file({"x": np.ones(2, np.float32)}, dst / "model.safetensors")
    with pytest.raises(DestinationExistsError):
        with atomic_directory(dst):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(dst, force=True) as staging:
            (staging / "partial").write_text("half")
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in dst.iterdir()) == ["model.safetensors", "tokenizer.json"]
    with atomic_directory(dst, force=True, keep=lambda name: name.endswith(".json")) as staging:
        save_file({"y": np.zeros(1, np.float32)}, staging / "model.safetensors")
    assert sorted(p.name for p in dst.iterdir()) == ["model.safetensors", "tokenizer.json"]
    assert list(load_file(dst / "model.safetensors")) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or backup left
