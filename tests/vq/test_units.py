"""Transformer-VQ parity units 1-8 and 10 (spec §6.3), each in both twins, against closed forms
or brute force written here, on hypothesis-drawn shapes, in float64."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from flax import nnx

import flax_impl.vq as F
import torch_impl.vq as T
from flax_impl.vq import quantizer as fq
from parity.vq.reference import rms_norm, sinusoids
from parity.vq.strategies import fixture_config
from torch_impl.vq import quantizer as tq

TOL = 1e-12  # float64: same formulas, only summation order differs (~1e-15)

# Flax runs jitted and shapes come from short lists: every new shape costs an XLA compile (eager
# JAX compiles op by op), which would blow the test budget. Values vary freely.


def tt(a):
    return torch.tensor(np.asarray(a))


def fj(a):
    return jnp.asarray(np.asarray(a))


def npy(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---- 1. RMS LayerNorm ------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(4, 5))
def _flax_ln(x, g, b, w, gain, bias):
    def fn(x):
        return F.layer_norm(x, g if gain else None, b if bias else None)
    return fn(x), jax.grad(lambda x: jnp.sum(fn(x) * w))(x)


@given(nd=st.sampled_from([(1, 1), (3, 5), (2, 8)]), gain=st.booleans(), bias=st.booleans(), seed=st.integers(0, 99))
def test_layer_norm_forward_and_gradient(nd, gain, bias, seed):
    n, d = nd
    r = np.random.default_rng(seed)
    x, g, b, w = r.standard_normal((n, d)), r.standard_normal(d), r.standard_normal(d), r.standard_normal((n, d))
    want = rms_norm(x) * (g if gain else 1.0) + (b if bias else 0.0)
    xt = tt(x).requires_grad_()
    yt = T.layer_norm(xt, tt(g) if gain else None, tt(b) if bias else None)
    (yt * tt(w)).sum().backward()
    yf, gf = _flax_ln(fj(x), fj(g), fj(b), fj(w), gain, bias)
    np.testing.assert_allclose(npy(yt), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(npy(yf), npy(yt), atol=TOL, rtol=0)
    np.testing.assert_allclose(npy(gf), xt.grad.numpy(), atol=TOL, rtol=0)
    # The gradient is the analytic one of x * rsqrt(eps + mean x^2) (g = 1 part checked by torch).
    assert np.abs(xt.grad.numpy()).max() > 0


def test_layer_norm_keeps_float64_and_promotes_bfloat16():
    x = np.random.default_rng(0).standard_normal((2, 6))
    assert T.layer_norm(tt(x), None, None).dtype == torch.float64
    assert F.layer_norm(fj(x), None, None).dtype == jnp.float64
    y = T.layer_norm(tt(x).to(torch.bfloat16), None, None)
    assert y.dtype == torch.bfloat16  # computed in float32, cast back


# ---- 2. sinusoids and ScaledSin --------------------------------------------------------------
@given(shape=st.sampled_from([(1, 1), (5, 2), (9, 5)]), start=st.integers(0, 50), flip=st.booleans())
def test_sinusoids_closed_form(shape, start, flip):
    (length, half), lam = shape, 1e4
    width = 2 * half
    want = sinusoids(start + np.arange(length), width, lam)
    want = want[::-1] if flip else want
    got_t = T.get_sinusoid_embs(length, width, lam, flip, start=start, dtype=torch.float64)
    got_f = jax.jit(F.get_sinusoid_embs, static_argnums=(0, 1, 2, 3, 5))(length, width, lam, flip, start, jnp.float64)
    np.testing.assert_allclose(npy(got_t), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(npy(got_f), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("scale", [0.0, 1.7])
def test_scaled_sin(scale):
    c = fixture_config()
    t, f = T.ScaledSin(c), F.ScaledSin(c, rngs=nnx.Rngs(0))
    assert float(t.scale.detach()) == 0.0 and float(f.scale[...]) == 0.0  # initialised to zero
    with torch.no_grad():
        t.scale.fill_(scale)
    f.scale[...] = jnp.asarray(scale)
    want = scale * sinusoids(5 + np.arange(4), c.d_model, c.pe_lam)
    np.testing.assert_allclose(npy(t(4, torch.tensor(5))), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(npy(f(4, jnp.asarray(5))), want, atol=TOL, rtol=0)


# ---- 3. rel_shift ----------------------------------------------------------------------------
LM = st.sampled_from([(1, 1), (2, 5), (4, 3), (6, 2)])  # (L, M)


@given(shape=LM)
def test_rel_shift_aligns_distances(shape):
    block_len, mem_len = shape
    w = mem_len + block_len
    i = np.arange(block_len)[:, None]
    col = np.arange(w)[None, :]
    # Column c of the unshifted scores holds the flipped sinusoid row c, i.e. distance W-1-c.
    x = (w - 1 - col) + 1000.0 * i + 0 * col
    for out in (npy(T.rel_shift(tt(x[None]))[0]), npy(F.rel_shift(fj(x[None]))[0])):
        for a in range(block_len):
            for j in range(w):
                if j - mem_len <= a:  # every causal column carries distance M + i - j
                    assert out[a, j] == (mem_len + a - j) + 1000.0 * a


# ---- 4. causal mask --------------------------------------------------------------------------
@given(shape=LM, locality=st.booleans(), which=st.integers(0, 2))
def test_causal_mask_truth_table(shape, locality, which):
    block_len, mem_len = shape
    invalid = [mem_len, max(mem_len - block_len, 0), 0][which]
    want = np.array([[j >= invalid and j - mem_len <= i and (not locality or j >= i)
                      for j in range(mem_len + block_len)] for i in range(block_len)])
    got_t = T.get_causal_mask(block_len, mem_len, torch.tensor(invalid), locality)
    got_f = F.get_causal_mask(block_len, mem_len, jnp.asarray(invalid), locality)
    np.testing.assert_array_equal(npy(got_t), want)
    np.testing.assert_array_equal(npy(got_f), want)


# ---- 5. aggcache biases ----------------------------------------------------------------------
@given(counts=st.lists(st.integers(0, 50), min_size=12, max_size=12))
def test_agg_biases_exponentiate_to_counts(counts):
    lower = np.asarray(counts, np.float64)
    for got in (npy(T.get_agg_biases(tt(lower))), npy(F.get_agg_biases(fj(lower)))):
        assert np.all(got[lower == 0] == -1e30)
        np.testing.assert_allclose(np.exp(got[lower > 0]), lower[lower > 0], rtol=1e-14)


# ---- 6-7. quantizer forward and backward ----------------------------------------------------
def _quantizer_case(seed, b, h, l, s, d):
    r = np.random.default_rng(seed)
    return (r.standard_normal((b, h, l, d)), r.standard_normal((h, s, d)), r.uniform(0.5, 3.0, (h, s)),
            (r.random((b, l)) < 0.7).astype(np.float64))


# (B, H, L, C, d_k)
QSHAPES = st.sampled_from([(1, 1, 1, 2, 2), (2, 2, 5, 6, 3)])


@nnx.jit
def _flax_quantize(model, k, mask):
    return model(k, F.VQSpec(jnp.array([1]), jnp.array([1]), mask), True)


@given(shape=QSHAPES, seed=st.integers(0, 999))
def test_quantizer_forward(shape, seed):
    b, h, l, s, d = shape
    k, c_sum, c_count, mask = _quantizer_case(seed, b, h, l, s, d)
    c = fixture_config(n_head=h, n_code=s, d_k=d)
    tm, fm = T.LearnableVQ(c), F.LearnableVQ(c, rngs=nnx.Rngs(0))
    with torch.no_grad():
        tm.c_sum.copy_(tt(c_sum)), tm.c_count.copy_(tt(c_count))
    fm.c_sum[...], fm.c_count[...] = fj(c_sum), fj(c_count)
    spec_t = T.VQSpec(torch.tensor([1]), torch.tensor([1]), tt(mask))
    cb = c_sum / np.maximum(c_count, 0.01)[..., None]
    dist2 = ((k[:, :, :, None] - cb[None, :, None]) ** 2).sum(-1)
    z_want = dist2.argmin(-1)
    for out, own in ((tm(tt(k), spec_t, True), tm.get_codebook()), (_flax_quantize(fm, fj(k), fj(mask)), fm.get_codebook())):
        z = npy(out["shortcodes"])
        np.testing.assert_array_equal(z, z_want)
        codewords = np.take_along_axis(cb[None], z[..., None], axis=2)
        np.testing.assert_array_equal(npy(T.get_codewords(tt(z), tt(cb))), codewords)
        np.testing.assert_array_equal(npy(F.get_codewords(fj(z), fj(cb))), codewords)
        # quantized is the codeword bit for bit: sg(cz) + (k - sg(k)) adds an exact zero
        np.testing.assert_array_equal(npy(out["quantized"]), npy(own)[np.arange(h)[None, :, None], z])
        np.testing.assert_allclose(npy(out["errs2"]), dist2.min(-1), atol=TOL)
        l_commit = np.mean(np.sum(mask[:, None, :] * dist2.min(-1), axis=1))
        np.testing.assert_allclose(float(npy(out["l_commit"])), l_commit, atol=TOL)
        assert float(npy(out["l_codebook"])) == 0.0  # the surrogate's value is exactly zero


@given(shape=QSHAPES, seed=st.integers(0, 999))
def test_quantizer_backward(shape, seed):
    b, h, l, s, d = shape
    k, c_sum, c_count, mask = _quantizer_case(seed, b, h, l, s, d)
    c = fixture_config(n_head=h, n_code=s, d_k=d)
    cb = c_sum / np.maximum(c_count, 0.01)[..., None]
    z = ((k[:, :, :, None] - cb[None, :, None]) ** 2).sum(-1).argmin(-1)
    cz = np.take_along_axis(cb[None], z[..., None], axis=2)
    want_commit = 2 * (k - cz) * mask[:, None, :, None] / (b * l)
    tm = T.LearnableVQ(c)
    with torch.no_grad():
        tm.c_sum.copy_(tt(c_sum)), tm.c_count.copy_(tt(c_count))
    spec_t = T.VQSpec(torch.tensor([1]), torch.tensor([1]), tt(mask))
    w = np.random.default_rng(seed + 1).standard_normal(k.shape)
    kt = tt(k).requires_grad_()
    out = tm(kt, spec_t, True)
    (gq,) = torch.autograd.grad((out["quantized"] * tt(w)).sum(), kt, retain_graph=True)
    np.testing.assert_array_equal(gq.numpy(), w)  # straight-through: exactly the identity
    gk, gs, gc = torch.autograd.grad(out["l_commit"] + (out["quantized"] * tt(w)).sum(),
                                     [kt, tm.c_sum, tm.c_count], allow_unused=True)
    np.testing.assert_allclose(gk.numpy() - w, want_commit, atol=TOL)
    assert gs is None and gc is None  # the codebook gets nothing from quantized and l_commit
    fm = F.LearnableVQ(c, rngs=nnx.Rngs(0))
    fm.c_sum[...], fm.c_count[...] = fj(c_sum), fj(c_count)
    g_model, g_k = _flax_quantize_grad(fm, fj(k), fj(mask), fj(w))
    np.testing.assert_allclose(np.asarray(g_k) - w, want_commit, atol=TOL)
    assert np.all(np.asarray(g_model["c_sum"][...]) == 0) and np.all(np.asarray(g_model["c_count"][...]) == 0)


@nnx.jit
def _flax_quantize_grad(model, k, mask, w):
    spec = F.VQSpec(jnp.array([1]), jnp.array([1]), mask)

    def f_loss(model, kk):
        o = model(kk, spec, True)
        return o["l_commit"] + jnp.sum(o["quantized"] * w)

    return nnx.grad(f_loss, argnums=(0, 1))(model, k)


# ---- 8. EMA surrogate ------------------------------------------------------------------------
def _surrogate_grads(mod, k_blocks, c_sum, c_count, masks, gamma, n_device, n_block):
    """Mean over blocks of the surrogate gradient, in one twin (`mod` is T.quantizer or F.quantizer)."""
    if mod is tq:
        cs, cc = tt(c_sum).requires_grad_(), tt(c_count).requires_grad_()
        total = 0
        for k, m in zip(k_blocks, masks):
            spec = tq.VQSpec(torch.tensor([n_device]), torch.tensor([n_block]), tt(m))
            cb = tq.get_codebook(cs, cc)
            z, _ = tq.get_shortcodes(tt(k), cb)
            total = total + tq.get_codebook_loss(tt(k), z, cs, cc, gamma, spec)
        loss = total / len(k_blocks)
        assert float(loss.detach()) == 0.0
        gs, gc = torch.autograd.grad(loss, [cs, cc])
        return gs.numpy(), gc.numpy()

    def loss(cs, cc):
        total = 0
        for k, m in zip(k_blocks, masks):
            spec = fq.VQSpec(jnp.array([n_device]), jnp.array([n_block]), fj(m))
            z, _ = fq.get_shortcodes(fj(k), fq.get_codebook(cs, cc))
            total = total + fq.get_codebook_loss(fj(k), z, cs, cc, gamma, spec)
        return total / len(k_blocks)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(fj(c_sum), fj(c_count))
    assert float(value) == 0.0
    return tuple(np.asarray(g) for g in grads)


@settings(max_examples=6)  # eager JAX autodiff of up to 9 block losses per example: keep it short
@given(n_block=st.integers(1, 3), n_device=st.integers(1, 3), l=st.sampled_from([1, 3]), seed=st.integers(0, 999),
       twin=st.sampled_from(["torch", "flax"]))
def test_ema_surrogate_is_one_ema_step(n_block, n_device, l, seed, twin):
    """SGD(lr=1) on the surrogate, gradients averaged over blocks and devices, equals one EMA
    step with the statistics of the concatenation of all blocks of all devices."""
    b, h, s, d, gamma = 2, 2, 5, 3, 0.9
    r = np.random.default_rng(seed)
    c_sum, c_count = r.standard_normal((h, s, d)), r.uniform(0.5, 3.0, (h, s))
    keys = r.standard_normal((n_device, n_block, b, h, l, d))
    masks = (r.random((n_device, n_block, b, l)) < 0.8).astype(np.float64)
    mod = tq if twin == "torch" else fq
    grads = [_surrogate_grads(mod, keys[i], c_sum, c_count, masks[i], gamma, n_device, n_block)
             for i in range(n_device)]
    g_sum = np.mean([g[0] for g in grads], axis=0)
    g_count = np.mean([g[1] for g in grads], axis=0)
    cb = c_sum / np.maximum(c_count, 0.01)[..., None]
    stat_sum, stat_count = np.zeros_like(c_sum), np.zeros_like(c_count)
    for k, m in zip(keys.reshape(-1, b, h, l, d), masks.reshape(-1, b, l)):
        z = ((k[:, :, :, None] - cb[None, :, None]) ** 2).sum(-1).argmin(-1)
        r_ = np.eye(s)[z] * m[:, None, :, None]  # [B,H,L,C]
        stat_sum += np.einsum("bhls,bhld->hsd", r_, k)
        stat_count += r_.sum(axis=(0, 2))
    np.testing.assert_allclose(c_sum - g_sum, gamma * c_sum + (1 - gamma) * stat_sum, atol=1e-12)
    np.testing.assert_allclose(c_count - g_count, gamma * c_count + (1 - gamma) * stat_count, atol=1e-12)


# ---- 10. update_state invariants -------------------------------------------------------------
@nnx.jit(static_argnums=(2,))
def _flax_blocks(attn, x, block_len):
    state = F.VQAttention.initial_state(attn.config, x.shape[0])
    for i in range(x.shape[1] // block_len):
        state, _ = attn(state, x[:, i * block_len:(i + 1) * block_len])
    k, v, _ = attn.get_kvg(attn.input_ln(x))  # projections are per token: same as per block
    z, _ = fq.get_shortcodes(k, attn.quantizer.get_codebook())
    return state, z, v


def _torch_blocks(attn, x, block_len):
    state = T.VQAttention.initial_state(attn.config, x.shape[0])
    for i in range(x.shape[1] // block_len):
        state, _ = attn(state, x[:, i * block_len:(i + 1) * block_len])
    k, v, _ = attn.get_kvg(attn.input_ln(x))
    z, _ = tq.get_shortcodes(k, attn.quantizer.get_codebook())
    return state, z, v


# (mem_len, n_block, block_len): L < M, L > M, and fewer tokens than M
@given(shape=st.sampled_from([(3, 3, 2), (1, 2, 4), (5, 1, 4)]), seed=st.integers(0, 99),
       twin=st.sampled_from(["torch", "flax"]))
def test_update_state_invariants(shape, seed, twin):
    mem_len, n_block, block_len = shape
    c = fixture_config(mem_len=mem_len)
    x = np.random.default_rng(seed).standard_normal((2, n_block * block_len, c.d_model))
    if twin == "torch":
        torch.manual_seed(seed)
        with torch.no_grad():
            state, z, v = _torch_blocks(T.VQAttention(c), tt(x), block_len)
    else:
        state, z, v = _flax_blocks(F.VQAttention(c, rngs=nnx.Rngs(seed)), fj(x), block_len)
    z, v = npy(z), npy(v)
    # the window history: M initial empty slots (code C, value 0), then every token
    z_all = np.concatenate([np.full((2, c.n_head, mem_len), c.n_code), z], axis=-1)
    v_all = np.concatenate([np.zeros((2, c.n_head, mem_len, c.d_v)), v], axis=-2)
    evicted_z, evicted_v = z_all[..., :-mem_len], v_all[..., :-mem_len, :]
    counts = np.stack([(evicted_z == s).sum(-1) for s in range(c.n_code)], axis=-1)
    np.testing.assert_array_equal(npy(state["aggcache"]["lower"]), counts)  # empty slots never counted
    sums = np.einsum("bhls,bhlv->bhsv", np.eye(c.n_code + 1)[evicted_z][..., :c.n_code], evicted_v)
    means = np.where(counts[..., None] > 0, sums / np.maximum(counts, 1)[..., None], 0.0)
    np.testing.assert_allclose(npy(state["aggcache"]["upper_div_lower"]), means, atol=TOL)
    np.testing.assert_array_equal(npy(state["xlcache"]["z"]), z_all[..., -mem_len:])
    np.testing.assert_allclose(npy(state["xlcache"]["v"]), v_all[..., -mem_len:, :], atol=TOL)
    assert int(npy(state["pos_offset"])) == n_block * block_len
    assert npy(state["aggcache"]["lower"]).sum() == 2 * c.n_head * max(0, n_block * block_len - mem_len)
