"""VQAttention: one gated attention unit (GAU) with vector-quantized keys, a Transformer-XL
relative bias, an uncompressed sliding cache (xlcache) and a compressed per-code cache (aggcache).

One call processes one block of L tokens and returns the new recurrent state. Shapes follow the
legend in `common.py`. The state of a sublayer (doc_ids are omitted: the reference carries them
but never reads them, so they cannot change any output):

    pos_offset               []            int32   tokens already seen
    xlcache.z                [B,H,M]       int32   codes of the last M keys (C = empty slot)
    xlcache.k_hat            [B,H,M,d_k]   param_dtype
    xlcache.v                [B,H,M,d_v]   dtype
    aggcache.upper_div_lower [B,H,C,d_v]   dtype   per-code mean of evicted values
    aggcache.lower           [B,H,C]       dtype   per-code count of evicted keys
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from weights.vq.config import TransformerVQConfig
from ..layers.precision import DEFAULT_PRECISION
from .common import MASK_INFTY_APPROX, at_least_float32, dropout_mask, linear, sg, to_dtype
from .norm import LayerNorm, layer_norm
from .position import get_sinusoid_embs
from .quantizer import LearnableVQ, VQSpec, one_hot

__all__ = ["rel_shift", "get_causal_mask", "get_agg_biases", "VQAttention"]


def rel_shift(x: jax.Array) -> jax.Array:
    """Transformer-XL shift [.., L, W] -> [.., L, W]: pad one zero on the LEFT, view as
    [.., W+1, L], drop the first row, view back. Then out[i, j] = x[i, j + L - 1 - i]."""
    *lead, present_len, past_len = x.shape
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
    x = x.reshape(*lead, past_len + 1, present_len)[..., 1:, :]
    return x.reshape(*lead, present_len, past_len)


def get_causal_mask(block_len: int, mem_len: int, invalid_len: jax.Array, with_locality: bool) -> jax.Array:
    """[L, W] bool: key j (frame position j, query i at M + i) is kept when it is allocated
    (j >= invalid_len), causal (j - M <= i) and, with locality, within distance M (j >= i)."""
    i = jnp.arange(block_len)[:, None]
    j = jnp.arange(mem_len + block_len)[None, :]
    keep = jnp.logical_and(j >= invalid_len, j - mem_len <= i)
    if with_locality:
        keep = jnp.logical_and(keep, j >= i)
    return keep


def get_agg_biases(lower: jax.Array) -> jax.Array:
    """log(count) per code, -1e30 for an empty code: exp(bias) = count."""
    return jnp.where(lower == 0, jnp.full_like(lower, -MASK_INFTY_APPROX),
                     jnp.log(jnp.clip(lower, min=1.0)))


class VQAttention(nnx.Module):
    """Gated attention with VQ keys: res = res_proj(attn(q, k_hat, v) * g), g = silu(gate)."""

    def __init__(self, config: TransformerVQConfig, *, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        c = self.config = config
        self.precision = precision
        pdt = self.param_dtype = to_dtype(c.param_dtype)
        self.dtype = to_dtype(c.dtype)
        self.tau = c.d_k ** 0.5
        hk, hv = c.n_head * c.d_k, c.n_head * c.d_v
        self.input_ln = LayerNorm(c, c.d_model)

        def dense(fan_in: int, fan_out: int) -> nnx.Linear:
            init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")  # untruncated
            return nnx.Linear(fan_in, fan_out, use_bias=False, dtype=self.dtype, param_dtype=pdt,
                              precision=precision, kernel_init=init, rngs=rngs)

        self.q_proj = dense(c.d_model, hk)
        self.kvg_proj = dense(c.d_model, hk + 2 * hv)
        self.r_proj = dense(c.d_model, hk)
        self.res_proj = dense(hv, c.d_model)
        self.u = nnx.Param(jnp.zeros(hk, dtype=pdt))
        self.v = nnx.Param(jnp.zeros(hk, dtype=pdt))
        self.quantizer = LearnableVQ(c, precision=precision, rngs=rngs)

    @staticmethod
    def initial_state(config: TransformerVQConfig, batch_size: int) -> dict:
        """Empty caches: every xlcache code is C (invalid), counts and means zero."""
        c = config
        prefix = (batch_size, c.n_head)
        pdt, dt = to_dtype(c.param_dtype), to_dtype(c.dtype)
        return dict(
            pos_offset=jnp.array(0, dtype=jnp.int32),
            xlcache=dict(
                z=jnp.full((*prefix, c.mem_len), c.n_code, dtype=jnp.int32),
                k_hat=jnp.zeros((*prefix, c.mem_len, c.d_k), dtype=pdt),
                v=jnp.zeros((*prefix, c.mem_len, c.d_v), dtype=dt),
            ),
            aggcache=dict(
                upper_div_lower=jnp.zeros((*prefix, c.n_code, c.d_v), dtype=dt),
                lower=jnp.zeros((*prefix, c.n_code), dtype=dt),
            ),
        )

    def get_q(self, x_tilde: jax.Array) -> jax.Array:
        """[B,L,E] -> q [B,H,L,d_k] in param_dtype, RMS-normalised and scaled by d_k^-1/4."""
        c = self.config
        bsz, present_len, _ = x_tilde.shape
        q = linear(x_tilde, self.q_proj.kernel[...], None, self.dtype, precision=self.precision)
        q = q.reshape(bsz, present_len, c.n_head, c.d_k)
        q = layer_norm(q, None, None) * (self.tau ** -0.5)
        return q.transpose(0, 2, 1, 3).astype(self.param_dtype)

    def get_kvg(self, x_tilde: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[B,L,E] -> k [B,H,L,d_k] (param_dtype), v [B,H,L,d_v], g [B,L,H*d_v] (dtype).
        The fused projection is cut k | v | g, head-major inside each chunk, as the reference's fused kernel is laid out."""
        c = self.config
        bsz, present_len, _ = x_tilde.shape
        kvg = linear(x_tilde, self.kvg_proj.kernel[...], None, self.dtype, precision=self.precision)
        k, v, g = jnp.split(kvg, [c.n_head * c.d_k, c.n_head * (c.d_k + c.d_v)], axis=-1)
        k = k.reshape(bsz, present_len, c.n_head, c.d_k)
        v = v.reshape(bsz, present_len, c.n_head, c.d_v)
        k = layer_norm(k, None, None) * (self.tau ** -0.5)
        v = jax.nn.silu(v)
        g = jax.nn.silu(g)
        return k.transpose(0, 2, 1, 3).astype(self.param_dtype), v.transpose(0, 2, 1, 3), g

    def get_xl_helpers(self, block_len: int, dropsin: jax.Array | None):
        """Relative features xl_r [H,W,d_k] (row w = distance W-1-w) and u', v' [1,H,1,d_k],
        each scaled by d_k^-1/4 (so q.k carries 1/sqrt(d_k), split evenly between the sides)."""
        c = self.config
        w = c.mem_len + block_len
        xl_r = get_sinusoid_embs(w, c.d_model, c.pe_lam, flip=True, dtype=at_least_float32(self.dtype))
        if dropsin is not None:
            xl_r = xl_r * dropsin
        xl_r = linear(xl_r, self.r_proj.kernel[...], None, self.dtype, precision=self.precision)
        xl_r = xl_r.reshape(w, c.n_head, c.d_k).transpose(1, 0, 2)
        xl_r = xl_r.astype(self.param_dtype) * (self.tau ** -0.5)
        xl_u = self.u[...].reshape(1, c.n_head, 1, c.d_k) * (self.tau ** -0.5)
        xl_v = self.v[...].reshape(1, c.n_head, 1, c.d_k) * (self.tau ** -0.5)
        return xl_r, xl_u, xl_v

    def attn(self, q, k, v, state: dict, vq_spec: VQSpec | None, is_train: bool,
             dropsin: jax.Array | None = None) -> dict:
        """Softmax attention over the recent window (xlcache + block) and the C aggcache codes."""
        c = self.config
        bsz, _, block_len, _ = q.shape
        vq = self.quantizer(k, vq_spec, is_train)
        xlcache, aggcache = state["xlcache"], state["aggcache"]
        recent_z = jnp.concatenate([xlcache["z"], vq["shortcodes"]], axis=-1)
        recent_k_hat = jnp.concatenate([xlcache["k_hat"], vq["quantized"]], axis=-2)
        recent_v = jnp.concatenate([xlcache["v"], v], axis=-2)
        xl_r, xl_u, xl_v = self.get_xl_helpers(block_len, dropsin)

        # Scores against the compressed cache: codewords plus log-count biases.
        cb = self.quantizer.get_codebook()
        cache_scores = jnp.einsum("bhlk,hsk->bhls", q + xl_u, cb, precision=self.precision)
        cache_scores = cache_scores + get_agg_biases(aggcache["lower"])[..., None, :]

        # Scores against the recent window; the relative bias only within distance <= M.
        invalid_len = jax.nn.relu(c.mem_len - state["pos_offset"])  # traced, so jit-safe
        ac = jnp.einsum("bhlk,bhwk->bhlw", q + xl_u, recent_k_hat, precision=self.precision)
        bd = rel_shift(jnp.einsum("bhlk,hwk->bhlw", q + xl_v, xl_r, precision=self.precision))
        bd = bd * get_causal_mask(block_len, c.mem_len, invalid_len, True)[None, None].astype(bd.dtype)
        recent_scores = ac + bd
        keep = get_causal_mask(block_len, c.mem_len, invalid_len, not c.agg_cache)[None, None]
        keep = keep.astype(recent_scores.dtype)
        recent_scores = recent_scores * keep - MASK_INFTY_APPROX * (1 - keep)

        # One joint max over both score sets, stop-gradient'ed, even without the aggcache, as the reference does.
        max_scores = sg(jnp.maximum(jnp.max(cache_scores, axis=-1), jnp.max(recent_scores, axis=-1)))
        cache_a = jnp.exp(cache_scores - max_scores[..., None]).astype(self.dtype)
        recent_a = jnp.exp(recent_scores - max_scores[..., None]).astype(self.dtype)

        # Normalise the weights before the value product: a.v is never formed unnormalised.
        d = jnp.sum(recent_a, axis=-1)
        if c.agg_cache:
            d = d + jnp.sum(cache_a, axis=-1)
        wv = jnp.einsum("bhlw,bhwv->bhlv", recent_a / d[..., None], recent_v, precision=self.precision)
        if c.agg_cache:
            wv = wv + jnp.einsum("bhls,bhsv->bhlv", cache_a / d[..., None], aggcache["upper_div_lower"], precision=self.precision)
        wv = wv.transpose(0, 2, 1, 3).reshape(bsz, block_len, c.n_head * c.d_v)
        return dict(attn_out=wv, recent_z=recent_z, recent_k_hat=recent_k_hat, recent_v=recent_v,
                    l_commit=vq["l_commit"], l_codebook=vq["l_codebook"], metrics=vq["metrics"])

    def update_state(self, recent_z, recent_k_hat, recent_v, state: dict) -> dict:
        """Evict the oldest L window entries into the aggcache (a running per-code mean, not a sum, for stability) and
        keep the newest M as the xlcache."""
        c = self.config
        m = c.mem_len
        block_len = recent_z.shape[-1] - m
        aggcache = state["aggcache"]
        delta = one_hot(recent_z[..., :-m], c.n_code, self.dtype)  # [B,H,L,C]; empty slots -> 0
        new_lower = aggcache["lower"] + jnp.sum(delta, axis=-2)
        f1 = aggcache["lower"] / jnp.clip(new_lower, min=1.0)
        f2 = delta / jnp.clip(new_lower, min=1.0)[..., None, :]
        new_upper_div_lower = (f1[..., None] * aggcache["upper_div_lower"]
                               + jnp.einsum("bhls,bhlv->bhsv", f2, recent_v[..., :-m, :], precision=self.precision))
        new_state = dict(
            pos_offset=state["pos_offset"] + block_len,
            xlcache=dict(z=recent_z[..., -m:], k_hat=recent_k_hat[..., -m:, :], v=recent_v[..., -m:, :]),
            aggcache=dict(upper_div_lower=new_upper_div_lower, lower=new_lower),
        )
        if not c.grad_thru_cache:
            new_state = tree_detach(new_state)
        return new_state

    def __call__(self, state: dict, x: jax.Array, vq_spec: VQSpec | None = None, *,
                 is_train: bool = False, dropsin: jax.Array | None = None,
                 rng: jax.Array | None = None) -> tuple[dict, dict]:
        """One block x [B,L,E] -> (new_state, {res, l_commit, l_codebook, metrics}).
        `dropsin` is the [W, E] sinusoid dropout mask shared by all blocks of a call."""
        x_tilde = self.input_ln(x)
        q = self.get_q(x_tilde)
        k, v, g = self.get_kvg(x_tilde)
        out = self.attn(q, k, v, state, vq_spec, is_train, dropsin)
        res = linear(out["attn_out"] * g, self.res_proj.kernel[...], None, self.dtype, precision=self.precision)
        if is_train:
            mask = dropout_mask(tuple(res.shape), self.config.p_dropres, res.dtype, rng)
            res = res if mask is None else res * mask
        new_state = self.update_state(out["recent_z"], out["recent_k_hat"], out["recent_v"], state)
        return new_state, dict(res=res, l_commit=out["l_commit"], l_codebook=out["l_codebook"],
                               metrics=out["metrics"])


def tree_detach(tree):
    """Stop-gradient on every array of a nested dict / list state."""
    return jax.tree_util.tree_map(jax.lax.stop_gradient, tree)
