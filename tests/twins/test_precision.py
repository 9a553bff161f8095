"""The one precision policy, tested on the CPU: the matmul switches a parity run sets are set and
restored, the `precision` of the Flax twin reaches every dot (in the jaxpr of a forward pass,
its gradient, a cached decode step and generation), and mixed precision (float32 parameters,
bfloat16 activations) keeps every activation in bfloat16 in both twins, equal to a pure
bfloat16 model holding the same (bfloat16-representable) weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_impl
import torch_impl
from flax_impl.layers import precision as fprec
from flax_impl.layers.moe import set_moe_dispatch as flax_dispatch
from parity import strategies as tst
from parity.loading import copy_weights
from torch_impl.layers import precision as tprec
from torch_impl.layers.moe import set_moe_dispatch as torch_dispatch

EXAMPLES = tst.family_examples()
HIGHEST = jax.lax.Precision.HIGHEST
TF32 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32
BF16X3 = jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3


# ---- the policy table ------------------------------------------------------------------------
@pytest.mark.parametrize("mode, dtype, platform, expected", [
    ("highest", jnp.float32, "gpu", HIGHEST),
    ("tf32", jnp.float32, "gpu", TF32),
    ("tf32", jnp.float32, "cuda", TF32),
    ("tf32", jnp.float32, "cpu", HIGHEST),  # XLA's CPU backend has no TF32
    ("bf16x3", jnp.float32, "gpu", BF16X3),
    ("bf16x3", jnp.float32, "tpu", BF16X3),
    ("tf32", jnp.bfloat16, "gpu", HIGHEST),  # only float32 dots have a mode
    ("bf16x3", jnp.float64, "gpu", HIGHEST),
])
def test_dot_precision_table(mode, dtype, platform, expected):
    assert fprec.dot_precision(mode, dtype, platform) == expected


def test_dot_precision_refuses_what_no_backend_offers():
    with pytest.raises(ValueError, match="TPUs have no TensorFloat-32"):
        fprec.dot_precision("tf32", jnp.float32, "tpu")
    with pytest.raises(ValueError, match="unknown matmul precision"):
        fprec.dot_precision("fast", jnp.float32, "gpu")


@pytest.mark.parametrize("mode", tprec.MATMUL_PRECISIONS)
def test_torch_switches_are_set_for_the_block_and_restored(mode):
    before = tprec.matmul_settings()
    with tprec.matmul_precision(mode) as inside:
        assert tprec.matmul_settings() == inside
        torch.ones(2, 2) @ torch.ones(2, 2)  # a float32 matmul runs under the switches
        gpu = inside.get("cuda.matmul", inside.get("cuda.matmul.allow_tf32"))
        assert gpu in (("tf32", "True") if mode == "tf32" else ("ieee", "False"))
        assert inside.get("mkldnn.matmul", "ieee") == "ieee"  # CPU float32 stays float32 in every mode
    assert tprec.matmul_settings() == before
    with pytest.raises(RuntimeError), tprec.matmul_precision(mode):  # restored on error too
        raise RuntimeError
    assert tprec.matmul_settings() == before
    assert fprec.MATMUL_PRECISIONS == tprec.MATMUL_PRECISIONS


def test_flax_default_precision_is_set_for_the_block_and_restored():
    before = fprec.matmul_settings()
    with fprec.matmul_precision("bf16x3") as inside:
        assert inside == {"jax_default_matmul_precision": "BF16_BF16_F32_X3"}
        with fprec.matmul_precision("tf32"):
            assert jax.config.jax_default_matmul_precision == "tensorfloat32"
        assert jax.config.jax_default_matmul_precision == "BF16_BF16_F32_X3"
    assert fprec.matmul_settings() == before


# ---- the precision reaches every dot ---------------------------------------------------------
def dot_precisions(jaxpr: jax.extend.core.ClosedJaxpr) -> list:
    """The `precision` of every dot in a jaxpr and all the jaxprs nested in it (jit, scan,
    while, custom_vjp...)."""
    found = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name in ("dot_general", "ragged_dot_general"):
                found.append(eqn.params["precision"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jaxpr.jaxpr)
    return found


def _same(found, precision) -> bool:
    # dot_general canonicalises a Precision to a (lhs, rhs) pair; an algorithm stays as it is.
    return found == precision or found == (precision, precision)


@pytest.mark.parametrize("family, dispatch, precision", [
    ("llama3", "dense", HIGHEST), ("qwen2", "dense", TF32),  # untied and tied LM heads
    ("gemma2", "dense", TF32), ("mixtral", "dense", HIGHEST), ("mixtral", "sparse", TF32),
], ids=["llama3-highest", "qwen2-tied-tf32", "gemma2-tf32", "mixtral-dense-highest", "mixtral-sparse-tf32"])
def test_precision_reaches_every_dot(family, dispatch, precision):
    """Forward with every output, its gradient, one cached decode step and `generate_records`:
    each dot (projections, attention's two matmuls, tied or untied LM head, router, experts)
    carries the model's precision. Traced only, so TF32 needs no GPU."""
    from flax_impl.generation import generate_records
    from weights.shared.generation import prepare_generation

    config = EXAMPLES[family]
    # Shapes only: the jaxprs are traced from abstract parameters, nothing is initialised.
    model = flax_dispatch(nnx.eval_shape(lambda: flax_impl.ForCausalLM(config, precision=precision, rngs=nnx.Rngs(0))),
                          dispatch)
    ids = jnp.ones((2, 5), jnp.int32)

    def loss(m, x):
        out = m(x, labels=x, output_hidden_states=True, output_attentions=True)
        return out.loss

    graphdef, state = nnx.split(model)
    grads = jax.make_jaxpr(lambda s, x: jax.grad(lambda p: loss(nnx.merge(graphdef, p), x))(s))(state, ids)
    cache = flax_impl.KVCache.init(config, 2, 6)
    step = jax.make_jaxpr(lambda s, c, x: nnx.merge(graphdef, s)(x, past_key_values=c, use_cache=True).logits)(
        state, cache, ids[:, :1])
    options = prepare_generation(np.ones((2, 5), np.int64), None, config, max_new_tokens=3, do_sample=False,
                                 temperature=1.0, top_k=None, top_p=None, allowed_tokens=None, num_beams=2,
                                 early_stopping=False, eos_token_id=2, pad_token_id=0, return_scores=True).options
    knobs = dict(temperature=jnp.ones(4), top_k=jnp.zeros(4, jnp.int32), top_p=jnp.ones(4),
                 allowed_first=jnp.ones(4, bool), penalties=jnp.ones(3), hyp_at_max=False)
    records = jax.make_jaxpr(lambda s: generate_records(
        nnx.merge(graphdef, s), jnp.ones((4, 5), jnp.int32), jnp.ones((4, 8), jnp.int32), jnp.ones((4, 5), jnp.int32),
        None, None, knobs, options)[0])(state)
    for name, jaxpr in (("gradient", grads), ("decode step", step), ("generation", records)):
        found = dot_precisions(jaxpr)
        assert found, f"{name}: no dot found"
        assert all(_same(p, precision) for p in found), f"{name}: {sorted(set(map(str, found)))}"


# ---- mixed precision: float32 parameters, bfloat16 activations ----------------------------------
def _bf16_representable(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights (norm gains near 1) that bfloat16 holds exactly, kept in float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") and not model.config.norm_unit_offset else 0.0
            p.copy_((base + 0.3 * torch.randn(p.shape, generator=g)).bfloat16().float())


def _mixed_and_pure(config, head: str = "ForCausalLM"):
    torch.manual_seed(0)
    mixed = getattr(torch_impl, head)(config, dtype=torch.bfloat16, param_dtype=torch.float32).eval()
    _bf16_representable(mixed)
    pure = getattr(torch_impl, head)(config, dtype=torch.bfloat16).eval()
    pure.load_state_dict({k: v.bfloat16() for k, v in mixed.state_dict().items()})
    f_mixed = nnx.eval_shape(lambda: getattr(flax_impl, head)(config, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                                              rngs=nnx.Rngs(0)))
    copy_weights(mixed, f_mixed)
    return mixed, pure, f_mixed


def _torch_run(model, ids):
    out = model(torch.from_numpy(ids), labels=torch.from_numpy(ids), output_hidden_states=True,
                output_attentions=True)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama3", "gemma", "gemma2", "mixtral"])
def test_mixed_precision_equals_pure_bfloat16_with_the_same_weights(family):
    """Parameters cast at use: float32 parameters holding bfloat16 values give bit for bit the
    pure bfloat16 model's activations, logits and loss; every activation is bfloat16 (no float32
    leaks into the residual stream), every parameter and gradient float32. Gemma's norm scale
    (1 + w) is formed in float32 from the weight either way, so it agrees too."""
    config = EXAMPLES[family]
    mixed, pure, _ = _mixed_and_pure(config)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 7))
    m_out, m_grads = _torch_run(mixed, ids)
    p_out, _ = _torch_run(pure, ids)
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}
    assert {g.dtype for g in m_grads.values()} == {torch.float32}
    for name, a, b in [("logits", m_out.logits, p_out.logits), ("loss", m_out.loss, p_out.loss)] + [
            (f"hidden {i}", a, b) for i, (a, b) in enumerate(zip(m_out.hidden_states, p_out.hidden_states))] + [
            (f"attention {i}", a, b) for i, (a, b) in enumerate(zip(m_out.attentions, p_out.attentions))]:
        if name != "loss":
            assert a.dtype == torch.bfloat16, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["gemma2"])  # sandwich norms, soft caps, (1 + w): the most casts
def test_flax_mixed_precision_keeps_activations_in_bfloat16(family):
    """The Flax twin's side of the same rule, on the same weights: float32 parameters and
    gradients, bfloat16 hidden states, attention maps and logits, and the torch twin's values
    within the bfloat16 tolerances (here the twins agree to a few bfloat16 ulps)."""
    from tests.helpers.twins import assert_close

    config = EXAMPLES[family]
    mixed, _, f_mixed = _mixed_and_pure(config)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 7))
    t_out, t_grads = _torch_run(mixed, ids)

    @nnx.jit
    def run(m, x):
        def loss(m):
            out = m(x, labels=x, output_hidden_states=True, output_attentions=True)
            return out.loss, out
        return nnx.value_and_grad(loss, has_aux=True)(m)

    (_, f_out), f_grads = run(f_mixed, jnp.asarray(ids))
    assert {v[...].dtype for _, v in nnx.to_flat_state(nnx.state(f_mixed, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert {v[...].dtype for _, v in nnx.to_flat_state(f_grads)} == {jnp.dtype(jnp.float32)}
    for h in f_out.hidden_states + f_out.attentions + (f_out.logits,):
        assert h.dtype == jnp.bfloat16
    assert_close("logits", t_out.logits, f_out.logits, "bfloat16")
    assert_close("hidden", t_out.hidden_states[-1], f_out.hidden_states[-1], "bfloat16")


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_rms_norm_returns_the_activation_dtype(unit_offset):
    """The bug issue 15 measured: a float32 norm weight on bfloat16 activations returned float32
    in the Flax twin. Both twins now return bfloat16, by HF's cast order: LLaMA multiplies in
    the activation dtype (weight cast at use), Gemma forms (1 + w) * x in float32 and casts after."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    w = (rng.standard_normal(8) * 0.3).astype(np.float32)
    x_bf = torch.from_numpy(x).bfloat16()
    t = torch_impl.RMSNorm(8, 1e-6, unit_offset, param_dtype=torch.float32)
    f = flax_impl.RMSNorm(8, 1e-6, unit_offset, param_dtype=jnp.float32)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(w))
    f.weight[...] = jnp.asarray(w)
    with torch.no_grad():
        t_out = t(x_bf)
    f_out = f(jnp.asarray(x_bf.float().numpy()).astype(jnp.bfloat16))
    assert t_out.dtype == torch.bfloat16 and f_out.dtype == jnp.bfloat16
    # Both twins agree bit for bit, and with the formula to within one bfloat16 rounding.
    np.testing.assert_array_equal(np.asarray(f_out, np.float32), t_out.float().numpy())
    xf = x_bf.float().numpy().astype(np.float64)
    normed = xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-6)
    want = normed * (1 + w) if unit_offset else w * normed
    np.testing.assert_allclose(t_out.float().numpy(), want, rtol=2 ** -7, atol=2 ** -7)


def test_precision_reaches_every_dot_of_the_vq_twin():
    """The Transformer-VQ Flax twin too: a train step's loss and gradient (projections, quantizer,
    codebook surrogate and metrics, untied logits), and the tied logits, every dot at the
    model's precision. Traced only, one layer (each layer is the same code)."""
    from flax_impl.vq.model import Transformer
    from flax_impl.vq.train import loss_fn
    from parity.vq.strategies import fixture_config

    config = fixture_config(e_tie=False, n_layer=1, dtype="float32", param_dtype="float32")
    model = nnx.eval_shape(lambda: Transformer(config, precision=TF32, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    b, p = config.global_batch_size, config.sequence_len
    batch = {k: jnp.ones((b, p), jnp.int32) for k in ("inputs", "targets", "loss_mask")}
    spec = flax_impl.vq.VQSpec(jnp.array([1]), jnp.array([1]), jnp.ones((b, p)))

    def step(s):
        return jax.grad(lambda q: loss_fn(nnx.merge(graphdef, q), batch, Transformer.initial_state(config, b),
                                          spec)[0])(s)

    tied = nnx.eval_shape(lambda: flax_impl.vq.Embeddings(config, precision=TF32, rngs=nnx.Rngs(0)))
    tied_graph, tied_state = nnx.split(tied)
    logits = jax.make_jaxpr(lambda s, x: nnx.merge(tied_graph, s).logits(x))(tied_state, jnp.ones((b, p, 8)))
    for name, jaxpr in (("train step", jax.make_jaxpr(step)(state)), ("tied logits", logits)):
        found = dot_precisions(jaxpr)
        assert found and all(_same(p, TF32) for p in found), (name, sorted(set(map(str, found))))
