"""Learnable VQ of the keys: shortcodes, codewords, exact straight-through, commitment loss and
the EMA k-means codebook trained through a surrogate loss (SGD at learning rate 1)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy as jsp
from flax import nnx

from weights.vq.config import TransformerVQConfig
from ..layers.precision import DEFAULT_PRECISION
from .common import sg, st, to_dtype

__all__ = ["VQSpec", "get_shortcodes", "get_codewords", "get_codebook", "get_codebook_ema_targets",
           "get_codebook_loss", "get_quantization_metrics", "LearnableVQ"]


class VQSpec(NamedTuple):
    """What the codebook surrogate needs beyond the keys.

    n_device: [1], data-parallel replicas whose gradients are averaged (the EMA is scaled by it).
    n_block_per_update: [1], blocks per optimizer update (gradients are averaged over them).
    loss_mask: [B, P] (or [B, L] for one block), 1 where a token counts.
    """

    n_device: jax.Array
    n_block_per_update: jax.Array
    loss_mask: jax.Array


def get_shortcodes(vecs: jax.Array, codebook: jax.Array,
                   precision: jax.lax.PrecisionLike = DEFAULT_PRECISION) -> tuple[jax.Array, jax.Array]:
    """vecs [B,H,L,d], codebook [H,C,d] -> (z [B,H,L] int32, errs2 [B,H,L]).

    Expanded |k|^2 - 2 k.c + |c|^2 (the reference's form: near-ties then break the same way); argmin takes the first index
    on ties; relu clips the cancellation negatives of the minimum."""
    diffs2 = (jnp.sum(jnp.square(vecs), axis=-1)[..., None]
              - 2.0 * jnp.einsum("bhlk,hsk->bhls", vecs, codebook, precision=precision)
              + jnp.sum(jnp.square(codebook), axis=-1)[None, :, None, :])
    z = jnp.argmin(diffs2, axis=-1)
    errs2 = jax.nn.relu(jnp.min(diffs2, axis=-1))
    return z.astype(jnp.int32), errs2


def get_codewords(shortcodes: jax.Array, codebook: jax.Array) -> jax.Array:
    """z [B,H,L], codebook [H,C,d] -> codewords [B,H,L,d] (a gather along C)."""
    return jnp.take_along_axis(codebook[None], shortcodes[..., None], axis=2)


def get_codebook(c_sum: jax.Array, c_count: jax.Array) -> jax.Array:
    """c = c_sum / max(c_count, 0.01), stop-gradient'ed: attention never trains the codebook."""
    return sg(c_sum / jnp.clip(c_count[..., None], min=0.01))


def one_hot(z: jax.Array, num_classes: int, dtype: jnp.dtype) -> jax.Array:
    """An out-of-range code (z == C, an empty cache slot) encodes to a zero row, so it is never counted;
    jax's one_hot does that already, torch's needs C + 1 classes."""
    return jax.nn.one_hot(z, num_classes, dtype=dtype)


def get_codebook_ema_targets(vecs, shortcodes, c_sum, c_count, c_gamma: float, vq_spec: VQSpec,
                             precision: jax.lax.PrecisionLike = DEFAULT_PRECISION):
    """EMA targets (1-g) d p sum_{b,t} r k + g c_sum and (1-g) d p sum r + g c_count,
    r = onehot(z) * mask; vecs [B,H,L,d], mask [B,L]."""
    g = c_gamma
    d, p = vq_spec.n_device, vq_spec.n_block_per_update
    r = one_hot(shortcodes, c_sum.shape[1], vecs.dtype)
    r = r * vq_spec.loss_mask[:, None, :, None].astype(vecs.dtype)
    c_sum_hat = d * p * jnp.einsum("bhts,bhtd->hsd", r, vecs, precision=precision)
    c_count_hat = d * p * jnp.sum(r, axis=(0, 2))
    c_sum_tgt = (1 - g) * c_sum_hat + g * c_sum
    c_count_tgt = (1 - g) * c_count_hat + g * c_count
    return c_sum_tgt, c_count_tgt


def get_codebook_loss(vecs, shortcodes, c_sum, c_count, c_gamma: float, vq_spec: VQSpec,
                      precision: jax.lax.PrecisionLike = DEFAULT_PRECISION) -> jax.Array:
    """Surrogate whose value is exactly 0 and whose gradient is c - target: one SGD(lr=1) step on
    it (gradients averaged over blocks and devices) is one EMA step of the codebook."""
    c_sum_tgt, c_count_tgt = get_codebook_ema_targets(vecs, shortcodes, c_sum, c_count, c_gamma, vq_spec,
                                                      precision=precision)
    l_sum = jnp.sum(sg(c_sum - c_sum_tgt) * st(c_sum))
    l_count = jnp.sum(sg(c_count - c_count_tgt) * st(c_count))
    return l_count + l_sum


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


def get_quantization_metrics(vecs, vecs_hat, errs2, c_sum, c_count, dtype: jnp.dtype,
                             precision: jax.lax.PrecisionLike = DEFAULT_PRECISION) -> dict[str, jax.Array]:
    """The reference's 19 codebook / quantization metrics, each averaged to a scalar in dtype."""
    n_code = c_count.shape[1]
    eps, errmin, errmax, maskval = 1e-2, 0.0, 10.0, 1e30
    c_count = jnp.clip(c_count, min=eps)
    c = c_sum / c_count[..., None]
    c_norms = jnp.clip(_norm(c), min=eps)
    c_normed = c / c_norms[..., None]
    c_sims = jnp.einsum("hsd,hzd->hsz", c_normed, c_normed, precision=precision)
    c_dists = _norm(c[:, :, None, :] - c[:, None, :, :])
    vec_norms = jnp.clip(_norm(vecs), min=eps)
    vec_hat_norms = jnp.clip(_norm(vecs_hat), min=eps)
    relative_errs = jnp.clip(jnp.sqrt(errs2) / vec_norms, errmin, errmax)
    probs = c_count / jnp.sum(c_count, axis=-1)[..., None]
    c_thresh_oob = jnp.logical_or(c_count < 1.0, 1_000_000 < c_count).astype(c_count.dtype)
    ones = jnp.ones([1, n_code, n_code], dtype=c_sims.dtype)
    up, low = jnp.triu(ones), jnp.tril(ones, k=-1)
    n_low = jnp.sum(low, axis=(1, 2))
    metrics = dict(
        c_sim_min=jnp.min(low * c_sims + maskval * up, axis=(1, 2)),
        c_sim_mean=jnp.sum(low * c_sims, axis=(1, 2)) / n_low,
        c_sim_max=jnp.max(low * c_sims - maskval * up, axis=(1, 2)),
        c_dist_min=jnp.min(low * c_dists + maskval * up, axis=(1, 2)),
        c_dist_mean=jnp.sum(low * c_dists, axis=(1, 2)) / n_low,
        c_dist_max=jnp.max(low * c_dists - maskval * up, axis=(1, 2)),
        c_norm_min=jnp.min(c_norms, axis=1),
        c_norm_mean=jnp.mean(c_norms, axis=1),
        c_norm_max=jnp.max(c_norms, axis=1),
        c_usage_min=jnp.min(c_count, axis=1),
        c_usage_mean=jnp.mean(c_count, axis=1),
        c_usage_max=jnp.max(c_count, axis=1),
        c_thresh_oob=jnp.sum(c_thresh_oob, axis=1),
        c_entropy=jnp.sum(jsp.special.entr(probs), axis=-1),
        vec_norm_mean=jnp.mean(vec_norms, axis=2),
        vec_hat_norm_mean=jnp.mean(vec_hat_norms, axis=2),
        relative_err_min=jnp.min(relative_errs, axis=2),
        relative_err_mean=jnp.mean(relative_errs, axis=2),
        relative_err_max=jnp.max(relative_errs, axis=2),
    )
    return {k: jnp.mean(sg(v)).astype(dtype) for k, v in metrics.items()}


class LearnableVQ(nnx.Module):
    """Per-head codebook `c_sum` [H,C,d_k] / `c_count` [H,C] (both parameters, trained only by
    the surrogate loss under SGD(lr=1))."""

    def __init__(self, config: TransformerVQConfig, *, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        self.config = config
        self.precision = precision
        pdt = to_dtype(config.param_dtype)
        self.param_dtype, self.dtype = pdt, to_dtype(config.dtype)
        h, s = config.n_head, config.n_code
        # variance_scaling(1, fan_in) of a [H, C, d_k] array: fan_in = C * H.
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.c_sum = nnx.Param(init(rngs.params(), (h, s, config.d_k), pdt))
        self.c_count = nnx.Param(jnp.ones((h, s), dtype=pdt))

    def get_codebook(self) -> jax.Array:
        """The stop-gradient'ed codebook [H, C, d_k]."""
        return get_codebook(self.c_sum[...], self.c_count[...])

    def __call__(self, vecs: jax.Array, vq_spec: VQSpec | None, is_train: bool) -> dict:
        """vecs [B,H,L,d_k] -> {quantized, shortcodes, l_commit, l_codebook, metrics, errs2}."""
        orig_dtype = vecs.dtype
        vecs_hp = vecs.astype(self.param_dtype)
        c = self.get_codebook()
        z, errs2 = get_shortcodes(vecs_hp, c, precision=self.precision)
        errs2 = errs2.astype(self.dtype)
        cz = get_codewords(z, c).astype(orig_dtype)
        # sg(cz) + st(k): forward value bit-exactly cz, gradient exactly the identity (k - k is an exact zero).
        vecs_hat = sg(cz) + st(vecs)
        zero = jnp.zeros((), dtype=self.dtype)
        l_commit, l_codebook, metrics = zero, zero, {}
        if is_train:
            mask = vq_spec.loss_mask.astype(errs2.dtype)
            l_commit = jnp.mean(jnp.sum(mask[:, None, :] * errs2, axis=1))
            l_codebook = get_codebook_loss(vecs_hp, z, self.c_sum[...], self.c_count[...], self.config.c_gamma,
                                           vq_spec, precision=self.precision).astype(self.dtype)
            metrics = get_quantization_metrics(sg(vecs), sg(vecs_hat), sg(errs2), sg(self.c_sum[...]),
                                               sg(self.c_count[...]), self.dtype, precision=self.precision)
        return dict(quantized=vecs_hat, shortcodes=z, l_commit=l_commit, l_codebook=l_codebook,
                    metrics=metrics, errs2=errs2)
