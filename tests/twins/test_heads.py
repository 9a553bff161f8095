"""The three heads in both twins: forward and loss parity, gradient parity for every
parameter, one AdamW step, classification pooling under padding, and QA's ignored positions."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hypothesis import example, given
from hypothesis import strategies as st

from parity import strategies as tst
from parity.compare import compare
from parity.loading import twins_from_config
from parity.tolerances import tolerance
from tests.helpers.examples import PINS
from tests.helpers.twins import assert_close, fcall, to_jax, to_torch
from weights.config import ModelConfig
from weights.names import hf_name, is_transposed

HEAD_OUTPUTS = {"causal_lm": ("logits",), "sequence_classification": ("logits",),
                "question_answering": ("start_logits", "end_logits")}


def head_labels(head, config, batch, rng, label_kind=None):
    """Label kwargs for `head`, drawn to exercise ignore rules and every problem type."""
    b, t = batch.input_ids.shape
    if head == "causal_lm":
        return {"labels": batch.labels}
    if head == "question_answering":
        # Positions beyond the sequence (ignored), negative ones (clamped to 0, as HF) and inside.
        return {"start_positions": rng.integers(-2, t + 3, b), "end_positions": rng.integers(-2, t + 3, b)}
    if label_kind == "regression" or config.num_labels == 1:
        return {"labels": rng.standard_normal((b,)) if config.num_labels == 1 else rng.standard_normal((b, config.num_labels))}
    if label_kind == "multi":
        return {"labels": rng.integers(0, 2, (b, config.num_labels)).astype(np.float64)}
    return {"labels": rng.integers(0, config.num_labels, b)}


def classification_safe(config):
    """A batch larger than one needs a pad token for pooling (tested separately)."""
    return config if config.pad_token_id is not None else config.replace(pad_token_id=0)


def torch_outputs_and_grads(model, batch, labels, dtype):
    model.zero_grad(set_to_none=True)
    out = model(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask), None,
                **{k: to_torch(v, dtype) for k, v in labels.items()})
    out.loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).double().numpy()
             for n, p in model.named_parameters()}
    return out, grads


@nnx.jit
def flax_loss_and_grads(model, ids, mask, kw):
    def loss(m):
        out = m(ids, mask, None, **kw)
        return out.loss, out

    (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return out, grads


def flax_outputs_and_grads(model, batch, labels, dtype):
    kw = {k: to_jax(v, dtype) for k, v in labels.items()}
    out, g = flax_loss_and_grads(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), kw)
    grads = {}
    for path, var in nnx.to_flat_state(g):
        name = hf_name(path)
        value = np.asarray(var[...]).astype(np.float64)
        grads[name] = value.T if is_transposed(name) else value
    return out, grads


def assert_grads_close(t_grads, f_grads, dtype):
    assert set(t_grads) == set(f_grads)
    tol = tolerance(dtype, "gradients")
    results = sorted((compare(n, t_grads[n], f_grads[n], tol) for n in t_grads), key=lambda c: -c.rel)
    worst = results[0]
    assert worst.passed, (f"worst gradient: {worst.name} max abs {worst.max_abs:.3e} rel {worst.rel:.3e} "
                          f"at {worst.worst_index} > {tol:.0e}")


@example(case=PINS["llama3_gqa_both_sides"], head="sequence_classification", label_kind="regression",
         dtype="float32", seed=3)
@example(case=PINS["gemma2"], head="question_answering", label_kind="single", dtype="float64", seed=4)
@given(case=tst.cases(far_positions=False, min_len=2), head=st.sampled_from(sorted(HEAD_OUTPUTS)),
       label_kind=st.sampled_from(["single", "multi", "regression"]), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 999))
def test_head_forward_loss_and_gradient_parity(case, head, label_kind, dtype, seed):
    config, batch = case
    if head != "causal_lm":
        config = classification_safe(config)
    if head == "sequence_classification" and label_kind == "regression":
        config = config.replace(problem_type="regression")  # explicit: MSE even with several labels
    labels = head_labels(head, config, batch, np.random.default_rng(seed), label_kind)
    t_model, f_model = twins_from_config(config, head, dtype).pair
    t_out, t_grads = torch_outputs_and_grads(t_model, batch, labels, dtype)
    f_out, f_grads = flax_outputs_and_grads(f_model, batch, labels, dtype)
    for field in HEAD_OUTPUTS[head]:
        assert_close(field, getattr(t_out, field), getattr(f_out, field), dtype, "logits")
    assert_close("loss", t_out.loss, f_out.loss, dtype, "loss")
    assert_grads_close(t_grads, f_grads, dtype)


@pytest.mark.parametrize("head", sorted(HEAD_OUTPUTS))
def test_one_adamw_step_leaves_the_same_parameters(head):
    config = ModelConfig(vocab_size=23, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=3,
                         attention_bias=True)
    batch = tst.Batch(np.array([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 0, 0]]), np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
                      None, np.array([[-100, -100, 5, 6, 7, 8], [3, 4, 5, 6, -100, -100]]))
    labels = head_labels(head, config, batch, np.random.default_rng(3))
    t_model, f_model = twins_from_config(config, head, "float64").pair
    hp = dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    opt = torch.optim.AdamW(t_model.parameters(), lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    torch_outputs_and_grads(t_model, batch, labels, "float64")
    opt.step()
    f_opt = nnx.Optimizer(f_model, optax.adamw(hp["lr"], hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["weight_decay"]),
                          wrt=nnx.Param)
    kw = {k: to_jax(v, "float64") for k, v in labels.items()}
    _, grads = flax_loss_and_grads(f_model, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), kw)
    f_opt.update(f_model, grads)
    from flax_impl.checkpoint import state_to_numpy as f_state
    from torch_impl.checkpoint import state_to_numpy as t_state

    after_t, after_f = t_state(t_model), f_state(f_model)
    moved = max(float(np.abs(after_t[n] - before).max()) for n, before in t_state(twins_from_config(config, head, "float64").pair[0]).items())
    assert moved > 1e-3  # the step really changed the parameters
    for name in after_t:
        c = compare(name, after_t[name], after_f[name], 1e-9)
        assert c.passed, c


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_classification_pooling_ignores_padding_side(twin):
    config = ModelConfig(vocab_size=19, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, pad_token_id=0, num_labels=3)
    t_model, f_model = twins_from_config(config, "sequence_classification", "float64").pair
    sentence = [5, 9, 2, 11]
    rows = {"none": (sentence, [1] * 4), "left": ([0, 0] + sentence, [0, 0, 1, 1, 1, 1]),
            "right": (sentence + [0, 0, 0], [1, 1, 1, 1, 0, 0, 0])}
    logits = {}
    for side, (ids, mask) in rows.items():
        ids, mask = np.array([ids]), np.array([mask])
        if twin == "torch":
            logits[side] = t_model(torch.from_numpy(ids), torch.from_numpy(mask)).logits.detach().numpy()
        else:
            logits[side] = np.asarray(fcall(f_model, jnp.asarray(ids), jnp.asarray(mask)).logits)
    assert_close("left vs none", logits["none"], logits["left"], "float64")
    assert_close("right vs none", logits["none"], logits["right"], "float64")


def test_classification_without_pad_token():
    config = ModelConfig(vocab_size=19, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    t_model, f_model = twins_from_config(config, "sequence_classification", "float64").pair
    ids = np.array([[3, 4, 5]])
    t_one = t_model(torch.from_numpy(ids)).logits
    f_one = fcall(f_model, jnp.asarray(ids)).logits
    full_t = t_model.score(t_model.model(torch.from_numpy(ids)).last_hidden_state)[:, -1]
    assert_close("last token", full_t, t_one, "float64")
    assert_close("twins", t_one, f_one, "float64")
    for model, arr in ((t_model, torch.from_numpy), (f_model, jnp.asarray)):
        with pytest.raises(ValueError, match="pad_token_id"):
            model(arr(np.array([[3, 4], [5, 6]])))


def numpy_qa_loss(start, end, s_pos, e_pos):
    """HF's rule written out: clamp to [0, T], T is ignored, mean over counted rows (0 if none)."""
    t = start.shape[1]

    def ce(logits, pos):
        pos = np.clip(pos, 0, t)
        terms = [np.log(np.exp(z - z.max()).sum()) + z.max() - z[p] for z, p in zip(logits, pos) if p != t]
        return sum(terms) / max(len(terms), 1)

    return (ce(start, s_pos) + ce(end, e_pos)) / 2


@pytest.mark.parametrize("positions", [
    ([1, 2], [3, 0]),  # all inside
    ([1, 40], [3, 6]),  # one start beyond the sequence: ignored
    ([-5, 2], [1, 2]),  # negative: clamped to 0 and counted, as HF does
    ([6, 99], [6, 7]),  # every position out of range: defined as 0 (HF: NaN)
])
def test_qa_loss_ignores_out_of_range_positions(positions):
    config = ModelConfig(vocab_size=19, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    t_model, f_model = twins_from_config(config, "question_answering", "float64").pair
    ids = np.array([[3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    s_pos, e_pos = np.array(positions[0]), np.array(positions[1])
    t_out = t_model(torch.from_numpy(ids), start_positions=torch.from_numpy(s_pos), end_positions=torch.from_numpy(e_pos))
    f_out = fcall(f_model, jnp.asarray(ids), None, None, jnp.asarray(s_pos), jnp.asarray(e_pos))
    expected = numpy_qa_loss(t_out.start_logits.detach().numpy(), t_out.end_logits.detach().numpy(), s_pos, e_pos)
    assert_close("torch loss vs formula", expected, t_out.loss, "float64")
    assert_close("flax loss vs formula", expected, f_out.loss, "float64")
    if positions == ([6, 99], [6, 7]):
        assert float(t_out.loss.detach()) == 0.0 and float(f_out.loss) == 0.0
