"""`weights.shapes`: the totals a config implies, in closed form, equal its table (every family,
every head); a checkpoint whose header disagrees with its config is refused before anything is
built, in milliseconds whatever the layer count; non-finite weights are found by name."""

from __future__ import annotations

import json
import math
import time

import ml_dtypes
import numpy as np
import pytest

import flax_impl
import torch_impl
from parity.strategies import family_examples
from tests.helpers.configs import TINY
from weights.checkpoint import CheckpointReader
from weights.errors import ConfigMismatchError, MemoryLimitError, ShapeMismatchError
from weights.finite import count_nonfinite, scan_nonfinite
from weights.names import HEADS
from weights.shapes import check_fits, check_memory, parameter_shapes, parameter_totals
from weights.synthetic import write_synthetic_checkpoint

CASES = [(name, head) for name in family_examples() for head in HEADS]


@pytest.mark.parametrize("family, head", CASES)
def test_closed_form_totals_equal_the_table(family, head):
    # The table itself equals both twins' parameters (tests/twins/test_mirror.py).
    for config in (family_examples()[family], family_examples()[family].replace(num_hidden_layers=5)):
        table = parameter_shapes(config, head)
        assert parameter_totals(config, head) == (len(table), sum(math.prod(s) for s in table.values()))


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 1024), ("vocab_size", 1 << 24),
                                          ("hidden_size", 1 << 16), ("num_local_experts", 4096)])
def test_a_config_far_larger_than_its_header_is_refused_in_milliseconds(tmp_path, field, value):
    d = write_synthetic_checkpoint(tmp_path / "c", TINY, dtype=np.float16)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    if field == "hidden_size":
        cfg["head_dim"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    from weights.config import ModelConfig

    config = ModelConfig.from_pretrained(d)
    with CheckpointReader(d) as reader:
        t0 = time.perf_counter()
        with pytest.raises((ConfigMismatchError, ShapeMismatchError)) as err:
            check_fits(reader, config, "causal_lm")
        assert time.perf_counter() - t0 < 0.5  # measured ~0.1 ms; generous for a loaded machine
    # More layers or experts than the header holds: refused from the totals; a wider tensor: by name.
    assert isinstance(err.value, ConfigMismatchError) == (field in ("num_hidden_layers", "num_local_experts"))
    assert len(str(err.value)) < 4000  # 20 tensors listed at most, then a count
    for cls in (torch_impl.ForCausalLM, flax_impl.ForCausalLM):  # the twins refuse it before building
        with pytest.raises(type(err.value)):
            cls.from_pretrained(d)


def test_an_honest_mismatch_lists_the_tensors(tmp_path):
    d = write_synthetic_checkpoint(tmp_path / "c", TINY, dtype=np.float16)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (d / "config.json").write_text(json.dumps(cfg))
    from weights.config import ModelConfig

    with CheckpointReader(d) as reader, pytest.raises(ShapeMismatchError, match="mlp.up_proj.weight"):
        check_fits(reader, ModelConfig.from_pretrained(d), "ForCausalLM")


def test_memory_bound():
    check_memory(1 << 20, "a small model")
    with pytest.raises(MemoryLimitError, match="more than this process can hold"):
        check_memory(1 << 62, "a huge model")


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16,
                                   ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz])
def test_count_nonfinite_equals_numpy(dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(5000).astype(np.float32)
    a[rng.integers(0, 5000, 37)] = np.nan
    a[rng.integers(0, 5000, 5)] = np.inf
    a[rng.integers(0, 5000, 5)] = -np.inf
    a = a.astype(dtype)
    assert count_nonfinite(a) == int(np.count_nonzero(~np.isfinite(a.astype(np.float64))))
    assert count_nonfinite(a.reshape(50, 100).T) == count_nonfinite(a)
    assert count_nonfinite(np.arange(10)) == 0


def test_scan_names_the_nonfinite_tensors(tmp_path):
    d = write_synthetic_checkpoint(tmp_path / "c", TINY, dtype=ml_dtypes.bfloat16)
    from weights.safetensors_io import load_file
    from weights.safetensors_writer import save_file

    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], np.nan)
    tensors["lm_head.weight"][3, 4] = np.inf
    save_file(tensors, d / "model.safetensors")
    with CheckpointReader(d) as reader:
        assert sorted(scan_nonfinite(reader)) == [("lm_head.weight", 1), ("model.norm.weight", TINY.hidden_size)]
