"""`assert_parity`: the parity check as one line of a user's own test suite.

    from parity.testing import assert_parity

    def test_my_checkpoint_runs_the_same_in_both_frameworks():
        assert_parity("path/to/checkpoint", dtype="float32")

It raises `AssertionError` carrying the whole table when any tensor is out of tolerance, and
returns the `Report` otherwise (so a test can assert more, e.g. on `report.worst()`). The float64
check (the default for a directory or a config) turns JAX's 64-bit mode on for its own duration
(`jax.enable_x64`) when it is off; a `(torch, flax)` pair in float64 must have been built with
64-bit mode on (`jax.config.update("jax_enable_x64", True)` in a `conftest.py`).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from weights.config import ModelConfig

from .inputs import Batch, seeded_batch
from .report import SECTIONS, Report

__all__ = ["assert_parity", "break_layer"]


def assert_parity(source: str | os.PathLike | ModelConfig | tuple[Any, Any], *, head: str | None = None,
                  dtype: str | None = None, seq_len: int = 16, batch_size: int = 3, seed: int = 0,
                  batch: Batch | None = None, sections: Iterable[str] = SECTIONS,
                  tolerances: Mapping[str, float] | None = None) -> Report:
    """Check that the two twins agree, or raise `AssertionError` with the report's table.

    `source` is a checkpoint directory, a `ModelConfig` (both twins built from the torch twin's
    seeded init, `head` defaulting to causal LM), or a `(torch_model, flax_model)` pair holding
    the same weights. `dtype` defaults to float64 (the semantic check), or to the pair's own
    dtype. Inputs are `seeded_batch(config, batch_size, seq_len, seed)` unless
    `batch` is given; `tolerances` overrides the table per quantity.
    """
    builds = isinstance(source, (str, os.PathLike, ModelConfig))
    if builds and (dtype or "float64") == "float64":
        import jax

        if not jax.config.jax_enable_x64:
            # float64 needs JAX's 64-bit mode; everything of this check is created inside it.
            with _enable_x64():
                return _assert_parity(source, head=head, dtype="float64", seq_len=seq_len, batch_size=batch_size,
                                      seed=seed, batch=batch, sections=sections, tolerances=tolerances)
    return _assert_parity(source, head=head, dtype=dtype, seq_len=seq_len, batch_size=batch_size, seed=seed,
                          batch=batch, sections=sections, tolerances=tolerances)


def _enable_x64() -> Any:
    """JAX's scoped 64-bit mode: `jax.enable_x64` (jax >= 0.7), `jax.experimental.enable_x64` before."""
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def _assert_parity(source: Any, *, head: str | None, dtype: str | None, seq_len: int, batch_size: int,
                   seed: int, batch: Batch | None, sections: Iterable[str],
                   tolerances: Mapping[str, float] | None) -> Report:
    from .check import check_checkpoint, check_pair
    from .loading import twins_from_config

    if isinstance(source, (str, os.PathLike)):
        if batch is not None:
            raise ValueError("a custom batch needs a ModelConfig or a model pair, not a directory")
        report = check_checkpoint(source, dtype or "float64", seq_len=seq_len, batch_size=batch_size, seed=seed, head=head,
                                  sections=sections, tolerances=tolerances)
    else:
        if isinstance(source, ModelConfig):
            dtype = dtype or "float64"
            twins = twins_from_config(source, head or "causal_lm", dtype, seed)
            torch_model, flax_model = twins.torch_model, twins.flax_model
        else:
            torch_model, flax_model = source
        config = torch_model.config
        batch = batch if batch is not None else seeded_batch(config, batch_size, seq_len, seed)
        report = check_pair(torch_model, flax_model, batch, dtype=dtype,
                            sections=sections, tolerances=tolerances, title="assert_parity")
    if not report.passed:
        raise AssertionError("the twins differ beyond tolerance\n" + report.format_table())
    return report


def break_layer(flax_model: Any, layer: int, module: str = "self_attn.o_proj", scale: float = 1.01) -> None:
    """Deliberately break the Flax twin: multiply one layer's `module` kernel by `scale`, in
    place. A parity check must then fail, and name `model.layers.{layer}` as the first
    divergence; use it to prove that a CI pipeline catches a one-layer regression."""
    target = flax_model.model.layers[layer]
    for attr in module.split("."):
        target = getattr(target, attr)
    target.kernel[...] = target.kernel[...] * scale
