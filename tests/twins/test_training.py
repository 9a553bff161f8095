"""Training in both twins (`torch_impl.training`, `flax_impl.training`): the schedule step by
step, the weight-decay groups, K AdamW steps leaving every parameter equal across twins
(float64), gradient accumulation equal to one big step, and remat leaving gradients unchanged."""

from __future__ import annotations

import dataclasses
import math

import jax
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from flax import nnx

import flax_impl.training as flax_training
import torch_impl.training as torch_training
from parity import strategies as tst
from parity.inputs import seeded_batch
from parity.loading import twins_from_config
from tests.helpers.training import train, worst_relative
from weights.names import hf_name
from weights.shared.training import TrainingHParams, decays, learning_rate_at

# Warmup (a step at learning rate 0, then half the peak), cosine decay, weight decay, and a
# clipping norm small enough that every step is clipped.
HPARAMS = TrainingHParams(learning_rate=1e-2, weight_decay=0.1, warmup_steps=2, max_steps=4, max_grad_norm=0.3)
PADDINGS = ("left", "right", "none", "left")


def _usable(config, head):
    # Sequence classification of several rows needs a pad id to find each row's last token.
    return head != "sequence_classification" or config.pad_token_id is not None


@pytest.mark.parametrize("hparams", [HPARAMS, TrainingHParams(learning_rate=3e-4, warmup_steps=0, max_steps=5),
                                     TrainingHParams(learning_rate=1.0, warmup_steps=3, max_steps=3)])
def test_schedule_step_by_step(hparams):
    transformers = pytest.importorskip("transformers")
    model = torch.nn.Linear(2, 2)
    t_opt = torch_training.make_optimizer(model, hparams)
    hf_opt = torch.optim.AdamW(model.parameters(), lr=hparams.learning_rate)
    hf_sched = transformers.get_cosine_schedule_with_warmup(hf_opt, hparams.warmup_steps, hparams.max_steps)
    flax_schedule = flax_training.learning_rate_schedule(hparams)
    for step in range(hparams.max_steps + 3):
        spec = learning_rate_at(hparams, step)
        assert t_opt.learning_rate == spec  # LambdaLR multiplies the peak by the spec's factor
        assert math.isclose(float(flax_schedule(step)), spec, rel_tol=1e-15, abs_tol=1e-300)
        if step <= hparams.max_steps:
            assert math.isclose(hf_sched.get_last_lr()[0], spec, rel_tol=1e-15, abs_tol=1e-300)
        t_opt.optimizer.zero_grad()
        t_opt.update()
        hf_opt.step()
        hf_sched.step()


def test_weight_decay_skips_biases_and_norm_gains():
    config = tst.family_examples()["llama3"]  # q/k/v/o and MLP biases
    twins = twins_from_config(config, "question_answering", "float64")
    t_opt = torch_training.make_optimizer(twins.torch_model, HPARAMS)
    decayed, plain = (set(map(id, g["params"])) for g in t_opt.optimizer.param_groups)
    names = {id(p): n for n, p in twins.torch_model.named_parameters()}
    assert {names[i] for i in plain} == {n for n in names.values() if n.endswith(("bias", "norm.weight"))}
    assert {names[i] for i in decayed} == {n for n in names.values() if decays(n)}
    assert "qa_outputs.bias" not in {names[i] for i in decayed} and "qa_outputs.weight" in {names[i] for i in decayed}
    f_mask = flax_training._decay_mask(nnx.state(twins.flax_model, nnx.Param))
    flat = {hf_name(tuple(k.key if hasattr(k, "key") else k.idx for k in path if not hasattr(k, "name"))): v
            for path, v in jax.tree_util.tree_flatten_with_path(f_mask)[0]}
    assert flat == {n: decays(n) for n in names.values()}


@settings(max_examples=3)
@given(tst.configs(families=True, sparse_routing=True), tst.heads(), st.integers(0, 2 ** 16))
def test_k_adamw_steps_leave_every_parameter_equal(config, head, seed):
    """float64: three steps with warmup, clipping and weight decay; every parameter within 1e-9."""
    if not _usable(config, head):
        head = "causal_lm"
    twins = twins_from_config(config, head, "float64", seed)
    batches = [seeded_batch(config, 3, 7, seed + k) for k in range(3)]
    t_params, t_metrics = train(twins.torch_model, "torch", batches, head, HPARAMS)
    f_params, f_metrics = train(twins.flax_model, "flax", batches, head, HPARAMS)
    name, err = worst_relative(t_params, f_params)
    assert err <= 1e-9, f"{name}: {err:.2e} after 3 steps"
    for t, f in zip(t_metrics, f_metrics):
        assert abs(t["loss"] - f["loss"]) <= 1e-10 * max(1, abs(t["loss"]))
        assert abs(t["grad_norm"] - f["grad_norm"]) <= 1e-9 * max(1, t["grad_norm"])
        assert t["learning_rate"] == pytest.approx(f["learning_rate"], rel=1e-15, abs=1e-300)
        assert t["tokens"] == f["tokens"]


@settings(max_examples=2)
@given(tst.configs(families=True, sparse_routing=True), tst.heads(), st.integers(0, 2 ** 16))
def test_accumulation_equals_one_big_step(config, head, seed):
    """float64: 4 micro-batches of one row each (their label counts differ: left, right and no
    padding) make the same update as the batch of 4 rows in one piece, in each twin."""
    if not _usable(config, head):
        head = "causal_lm"
    # The load-balancing loss is a mean per micro-batch (HF's convention too): not additive over rows.
    config = dataclasses.replace(config, output_router_logits=False)
    twins = twins_from_config(config, head, "float64", seed)
    batch = seeded_batch(config, 4, 8, seed, paddings=PADDINGS)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1  # uneven counts
    reference = twins_from_config(config, head, "float64", seed).torch_model
    ref_params, ref_metrics = train(reference, "torch", [batch, batch], head, HPARAMS)
    for model, framework in ((twins.torch_model, "torch"), (twins.flax_model, "flax")):
        params, metrics = train(model, framework, [batch, batch], head, HPARAMS, accumulation_steps=4)
        name, err = worst_relative(ref_params, params)
        assert err <= 1e-10, f"{framework}: {name} differs by {err:.2e}"
        assert metrics[0]["loss"] == pytest.approx(ref_metrics[0]["loss"], rel=1e-12)


def test_accumulation_steps_must_divide_the_rows():
    config = tst.family_examples()["llama2"]
    twins = twins_from_config(config, "causal_lm", "float64")
    batch = seeded_batch(config, 3, 5, 0)
    for model, framework in zip(twins.pair, ("torch", "flax")):
        with pytest.raises(ValueError, match="accumulation_steps=2 must be >= 1 and divide the batch's 3 rows"):
            train(model, framework, [batch], "causal_lm", HPARAMS, accumulation_steps=2)
