"""Training in both twins (`torch_impl.training`, `flax_impl.training`): the schedule step by
step, the weight-decay groups, K AdamW steps leaving every parameter equal across twins
(float64), gradient accumulation equal to one big step, remat leaving gradients unchanged, and
mixed precision (bfloat16 products on float32 master weights) tracking float32."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from flax import nnx

import flax_impl.training as flax_training
import torch_impl.training as torch_training
from flax_impl.checkpoint import state_to_numpy as flax_state
from parity import strategies as tst
from parity.check.training import CHECK_HPARAMS, check_training_pair, training_batch
from parity.inputs import seeded_batch
from parity.loading import twins_from_config
from parity.tolerances import tolerance
from tests.helpers.training import train, worst_relative
from tests.helpers.twins import run_flax, run_torch
from torch_impl.checkpoint import state_to_numpy as torch_state
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


DROPOUT = st.tuples(st.sampled_from([0.0, 0.1]), st.sampled_from([0.0, 0.1, 0.3]))  # attention, hidden


@settings(max_examples=4)
@given(tst.configs(families=True, sparse_routing=True), tst.heads(), DROPOUT, st.sampled_from([1, 4]),
       st.integers(0, 2 ** 16))
def test_k_adamw_steps_in_both_twins(config, head, dropout, accumulation_steps, seed):
    """float64, train mode, three steps with warmup, clipping, weight decay and dropout (drawn) on
    batches of 4 rows: the Flax twin's parameters equal the torch twin's to 1e-9. With 4
    micro-batches of one row (their label counts differ: left, right and no padding), both twins
    equal the torch twin's one big step to 1e-10, dropout included (each row draws its mask by its
    place in the whole batch)."""
    if not _usable(config, head):
        head = "causal_lm"
    # The load-balancing loss is a mean per micro-batch (HF's convention too): not additive over rows.
    config = dataclasses.replace(config, attention_dropout=dropout[0], hidden_dropout=dropout[1],
                                 output_router_logits=config.output_router_logits and accumulation_steps == 1)
    batches = [seeded_batch(config, 4, 7, seed + k, paddings=PADDINGS) for k in range(3)]
    assert len(set(batches[0].attention_mask.sum(1).tolist())) > 1  # uneven label counts
    reference = twins_from_config(config, head, "float64", seed).torch_model
    ref_params, ref_metrics = train(reference, "torch", batches, head, HPARAMS)
    twins = twins_from_config(config, head, "float64", seed)
    bound = 1e-9 if accumulation_steps == 1 else 1e-10
    runs = [(twins.flax_model, "flax")] + ([(twins.torch_model, "torch")] if accumulation_steps > 1 else [])
    for model, framework in runs:
        params, metrics = train(model, framework, batches, head, HPARAMS, accumulation_steps)
        name, err = worst_relative(ref_params, params)
        assert err <= bound, f"{framework}, {accumulation_steps} micro-batches: {name} differs by {err:.2e}"
        for r, m in zip(ref_metrics, metrics):
            assert abs(r["loss"] - m["loss"]) <= 1e-10 * max(1, abs(r["loss"]))
            assert abs(r["grad_norm"] - m["grad_norm"]) <= 1e-9 * max(1, r["grad_norm"])
            assert r["learning_rate"] == pytest.approx(m["learning_rate"], rel=1e-15, abs=1e-300)
            assert r["tokens"] == m["tokens"]


def test_accumulation_steps_must_divide_the_rows():
    config = tst.family_examples()["llama2"]
    twins = twins_from_config(config, "causal_lm", "float64")
    batch = seeded_batch(config, 3, 5, 0)
    for model, framework in zip(twins.pair, ("torch", "flax")):
        with pytest.raises(ValueError, match="accumulation_steps=2 must be >= 1 and divide the batch's 3 rows"):
            train(model, framework, [batch], "causal_lm", HPARAMS, accumulation_steps=2)


def _gradients(model, framework: str, batch, head: str) -> dict[str, np.ndarray]:
    if framework == "torch":
        model.zero_grad(set_to_none=True)
        run_torch(model, batch).loss.backward()
        return {n: p.grad.double().numpy() for n, p in model.named_parameters()}
    grads = _flax_grads(model, {k: jnp.asarray(v) for k, v in batch.items()})
    return {hf_name(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}  # kernels as they are


@nnx.jit
def _flax_grads(model, batch):
    return nnx.grad(lambda m: m(**batch).loss)(model)


@settings(max_examples=1)
@given(tst.configs(families=True, sparse_routing=True), tst.heads(), st.integers(0, 2 ** 16))
def test_remat_leaves_gradients_unchanged(config, head, seed):
    """float64, each twin: the gradients with `gradient_checkpointing` equal those without (1e-12),
    and remat really ran (torch: each layer's forward twice; Flax: a checkpoint in the program)."""
    if not _usable(config, head):
        head = "causal_lm"
    twins = twins_from_config(config, head, "float64", seed)
    b = seeded_batch(config, 3, 7, seed)
    batch = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "position_ids": b.position_ids,
             **b.head_labels(head)}
    calls = []
    twins.torch_model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    for model, framework in zip(twins.pair, ("torch", "flax")):
        plain = _gradients(model, framework, batch, head)
        model.gradient_checkpointing_enable()
        remat = _gradients(model, framework, batch, head)
        model.gradient_checkpointing_disable()
        name, err = worst_relative(plain, remat)
        assert err <= 1e-12, f"{framework}: {name} differs by {err:.2e} with remat"
    assert len(calls) == 3  # once without remat, twice (forward, then again in the backward) with it
    model = twins.flax_model
    model.gradient_checkpointing_enable()
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(**{k: jnp.asarray(v) for k, v in batch.items()}).loss)
    assert "checkpoint" in str(jaxpr(state)) or "remat" in str(jaxpr(state))


def test_mixed_precision_tracks_float32_and_the_twins_agree():
    """bfloat16 compute on float32 master weights (`param_dtype=float32`): parameters, gradients
    and both twins' AdamW moments are float32 and the loss is float32; after 3 AdamW steps the
    twins agree within the table's "bfloat16/float32" row (the training check, as `twinlm check
    --train-steps 3 --dtype bfloat16 --param-dtype float32` runs it), and each twin's parameters
    are within the "bfloat16/float32 vs float32" row of the torch twin's float32 run."""
    config, head = tst.family_examples()["gemma2"], "causal_lm"  # soft caps, sandwich norms: the most casts
    hparams = TrainingHParams(**CHECK_HPARAMS, max_steps=3)
    batches = [seeded_batch(config, 3, 9, k) for k in range(3)]
    reference, _ = train(twins_from_config(config, head, "float32").torch_model, "torch", batches, head, hparams)
    twins = twins_from_config(config, head, "bfloat16", param_dtype="float32")
    report = check_training_pair(twins.torch_model, twins.flax_model, batches, head, hparams, dtype="bfloat16",
                                 param_dtype="float32")
    assert report.passed, report.format_table()
    assert {r.comparison.tolerance for r in report.rows if r.quantity == "parameters"} == {
        tolerance("bfloat16/float32", "parameters")}
    t_model, f_model = twins.torch_model, twins.flax_model
    bound = tolerance("bfloat16/float32 vs float32", "parameters")
    for framework, params in (("torch", torch_state(t_model)), ("flax", flax_state(f_model))):
        name, err = worst_relative(reference, params)
        assert err <= bound, f"{framework} mixed precision: {name} is {err:.2e} from float32 (bound {bound:.0e})"
    assert {p.dtype for p in t_model.parameters()} == {p.grad.dtype for p in t_model.parameters()} == {torch.float32}
    t_opt = torch_training.make_optimizer(t_model, hparams)
    t_model.train()
    metrics = torch_training.train_step(t_model, t_opt, training_batch(batches[0], head, "torch"))
    assert metrics["loss"].dtype == torch.float32
    assert {v.dtype for s in t_opt.optimizer.state.values() for v in s.values() if v.ndim} == {torch.float32}
    f_opt = flax_training.make_optimizer(f_model, hparams)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(f_opt))
            if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
