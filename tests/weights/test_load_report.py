"""Matching a checkpoint against a model: strict errors list every offending tensor; the benign
cases transformers produces (inv_freq, `transformer.` prefix, tied head) are handled."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tests.helpers.configs import TINY
from weights.checkpoint import CheckpointReader
from weights.errors import (MissingKeysError, ShapeMismatchError, StateMismatchError, TiedWeightsMismatchError,
                            UnexpectedKeysError)
from weights.names import hf_shapes
from weights.report import iter_tensors, match_state
from weights.safetensors_writer import save_file
from weights.synthetic import synthetic_tensor

BF16 = np.dtype(ml_dtypes.bfloat16)


def expected_of(shapes, dtype=np.float32):
    return {k: (s, np.dtype(dtype)) for k, s in shapes.items()}


def make(tmp_path, tensors):
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, tmp_path / "model.safetensors")
    return CheckpointReader(tmp_path)


def tensors_of(shapes, dtype=BF16):
    return {k: synthetic_tensor(k, s, dtype) for k, s in shapes.items()}


def test_exact_match_loads_everything_bit_exact(tmp_path):
    shapes = hf_shapes(TINY)
    tensors = tensors_of(shapes)
    reader = make(tmp_path, tensors)
    report = match_state(expected_of(shapes), reader)  # bf16 into an f32 model: a cast, not an error
    assert report.ok and set(report.sources) == set(shapes)
    assert report.describe() == "checkpoint matches the model"
    for name, arr in iter_tensors(reader, report.sources):
        assert arr.tobytes() == tensors[name].tobytes()
    cast = dict(iter_tensors(reader, report.sources, dtype=np.float32))
    assert all(np.array_equal(cast[k], tensors[k].astype(np.float32)) for k in shapes)


def test_strict_lists_every_problem_with_expected_and_found(tmp_path):
    shapes = hf_shapes(TINY)
    tensors = tensors_of(shapes)
    del tensors["model.norm.weight"], tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), BF16)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 32), np.int32)
    tensors["model.layers.9.extra.weight"] = np.zeros(3, BF16)
    reader = make(tmp_path, tensors)
    with pytest.raises(ShapeMismatchError) as info:  # the most specific class; all kinds listed
        match_state(expected_of(shapes), reader)
    msg, report = str(info.value), info.value.report
    assert "model.layers.0.self_attn.q_proj.weight: shape mismatch: expected [32, 32] float32, found [32, 31] bfloat16" in msg
    assert "model.layers.0.self_attn.k_proj.weight: dtype mismatch" in msg and "int32" in msg
    assert "model.norm.weight" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.9.extra.weight" in msg and str(tmp_path) in msg
    assert sorted(report.missing) == ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    assert report.unexpected == ["model.layers.9.extra.weight"]
    assert sorted((m.name, m.reason) for m in report.mismatched) == [
        ("model.layers.0.self_attn.k_proj.weight", "dtype"), ("model.layers.0.self_attn.q_proj.weight", "shape")]


def test_error_class_by_kind_and_non_strict_returns_report(tmp_path):
    shapes = hf_shapes(TINY)
    tensors = tensors_of(shapes)
    extra = dict(tensors, **{"stray.weight": np.zeros(2, BF16)})
    with pytest.raises(UnexpectedKeysError):
        match_state(expected_of(shapes), make(tmp_path / "u", extra))
    fewer = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    reader = make(tmp_path / "m", fewer)
    with pytest.raises(MissingKeysError, match="lm_head.weight"):
        match_state(expected_of(shapes), reader)
    report = match_state(expected_of(shapes), reader, strict=False)
    assert report.missing == ["lm_head.weight"] and not report.ok
    assert "lm_head.weight" not in report.sources and len(report.sources) == len(shapes) - 1
    assert issubclass(MissingKeysError, StateMismatchError)


def test_inv_freq_buffers_are_ignored(tmp_path):
    shapes = hf_shapes(TINY)
    tensors = tensors_of(shapes)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    report = match_state(expected_of(shapes), make(tmp_path, tensors))
    assert report.ok and report.ignored == ["model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_legacy_transformer_prefix_of_qa_checkpoints(tmp_path):
    shapes = hf_shapes(TINY, "question_answering")
    tensors = {("transformer." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in tensors_of(shapes).items()}
    reader = make(tmp_path, tensors)
    report = match_state(expected_of(shapes), reader)
    assert report.ok and report.renamed["transformer.norm.weight"] == "model.norm.weight"
    assert report.sources["model.norm.weight"] == "transformer.norm.weight"
    assert reader.get("transformer.norm.weight").tobytes() == tensors["transformer.norm.weight"].tobytes()


TIED = TINY.replace(tie_word_embeddings=True)


@pytest.mark.parametrize("model_has_head", [True, False])
def test_tied_head_absent_or_equal_is_fine(tmp_path, model_has_head):
    shapes = hf_shapes(TIED)  # transformers leaves the tied head out
    expected = expected_of(dict(shapes, **({"lm_head.weight": (64, 32)} if model_has_head else {})))
    tensors = tensors_of(shapes)
    report = match_state(expected, make(tmp_path / "absent", tensors), tie_word_embeddings=True)
    assert report.ok
    if model_has_head:
        assert report.sources["lm_head.weight"] == "model.embed_tokens.weight"
    with_head = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].copy()})
    report = match_state(expected, make(tmp_path / "equal", with_head), tie_word_embeddings=True)
    assert report.ok and "lm_head.weight" in report.ignored


def test_tied_head_that_differs_is_an_error(tmp_path):
    shapes = hf_shapes(TIED)
    tensors = tensors_of(shapes)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + BF16.type(1)
    with pytest.raises(TiedWeightsMismatchError, match="tied to model.embed_tokens.weight but differs"):
        match_state(expected_of(shapes), make(tmp_path, tensors), tie_word_embeddings=True)
    # Untied, the same head is an ordinary unexpected tensor for a model that has none.
    with pytest.raises(UnexpectedKeysError):
        match_state(expected_of(shapes), CheckpointReader(tmp_path), tie_word_embeddings=False)
