"""TransformerLayer: two VQ-attention (GAU) sublayers, each run over all blocks of the call with
its own carried state, each followed by a LayerDrop'ed residual add. There is no MLP: a GAU
plays both roles, so two GAUs mirror the Attn + MLP pair of a standard layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from weights.vq.config import TransformerVQConfig
from ..layers.precision import DEFAULT_PRECISION
from .attention import VQAttention
from .common import at_least_float32, dropout_mask, to_dtype
from .quantizer import VQSpec

__all__ = ["TransformerLayer", "mean_over_blocks"]


def mean_over_blocks(outs: list[dict]) -> dict:
    """Average per-block losses and metrics over the blocks (the reference's tree-mapped mean)."""
    l_commit = jnp.mean(jnp.stack([o["l_commit"] for o in outs]))
    l_codebook = jnp.mean(jnp.stack([o["l_codebook"] for o in outs]))
    metrics = {k: jnp.mean(jnp.stack([o["metrics"][k] for o in outs])) for k in outs[0]["metrics"]}
    return dict(l_commit=l_commit, l_codebook=l_codebook, metrics=metrics)


def _key(rng: jax.Array | None, *data: int) -> jax.Array | None:
    if rng is None:
        return None
    for d in data:
        rng = jax.random.fold_in(rng, d)
    return rng


class TransformerLayer(nnx.Module):
    """`scanned_attn1` then `scanned_attn2`, pre-norm (the norm is inside each sublayer)."""

    def __init__(self, config: TransformerVQConfig, *, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = to_dtype(config.dtype)
        self.scanned_attn1 = VQAttention(config, precision=precision, rngs=rngs)
        self.scanned_attn2 = VQAttention(config, precision=precision, rngs=rngs)

    @staticmethod
    def initial_state(config: TransformerVQConfig, batch_size: int) -> list[dict]:
        """[state of sublayer 1, state of sublayer 2]."""
        return [VQAttention.initial_state(config, batch_size), VQAttention.initial_state(config, batch_size)]

    def _sublayer(self, attn: VQAttention, x: jax.Array, state: dict, vq_specs: VQSpec | None,
                  is_train: bool, rng: jax.Array | None):
        """Scan one sublayer over the N blocks of x [N,B,L,E]; returns ([N,B,L,E], state, aux).
        `vq_specs` holds a [N,B,L] loss mask (blocks first)."""
        c = self.config
        n_block, bsz, block_len, _ = x.shape
        # "timeless" masks: drawn once per call, shared by every block; "ephemeral" per block.
        dropsin = dropout_mask((c.mem_len + block_len, c.d_model), c.p_dropsin,
                               at_least_float32(self.dtype), _key(rng, 0)) if is_train else None
        droplyr = dropout_mask((1, bsz, 1, 1), c.p_droplyr, self.dtype, _key(rng, 1)) if is_train else None
        masks = None if vq_specs is None else vq_specs.loss_mask

        def step(state, k, x_k, mask_k):
            spec = None if vq_specs is None else VQSpec(vq_specs.n_device, vq_specs.n_block_per_update, mask_k)
            return attn(state, x_k, spec, is_train=is_train, dropsin=dropsin, rng=_key(rng, 2, k))

        # Under a trace (jit, grad) the blocks run under jax.lax.scan: one traced body, so the
        # compile time does not grow with the block count. Eagerly a Python loop (like torch)
        # avoids compiling a fresh scan on every call. Both give the same numbers.
        if isinstance(x, jax.core.Tracer):
            def body(state, xs):
                k, x_k, mask_k = xs
                state, out = step(state, k, x_k, mask_k)
                return state, out

            state, outs = jax.lax.scan(body, state, (jnp.arange(n_block), x, masks))
            r = outs.pop("res")
            aux = dict(l_commit=jnp.mean(outs["l_commit"]), l_codebook=jnp.mean(outs["l_codebook"]),
                       metrics={k: jnp.mean(v) for k, v in outs["metrics"].items()})
        else:
            res, outs = [], []
            for k in range(n_block):
                state, out = step(state, k, x[k], None if masks is None else masks[k])
                res.append(out.pop("res"))
                outs.append(out)
            r = jnp.stack(res)
            aux = mean_over_blocks(outs)
        if droplyr is not None:
            r = r * droplyr
        return x + r, state, aux

    def __call__(self, x: jax.Array, state: list[dict], vq_specs: VQSpec | None = None, *,
                 is_train: bool = False, rng: jax.Array | None = None) -> dict:
        """x [N,B,L,E] -> {output_features, attn_state, l_commit, l_codebook, metrics}."""
        state1, state2 = state
        x, state1, aux1 = self._sublayer(self.scanned_attn1, x, state1, vq_specs, is_train,
                                         _key(rng, 1))
        x, state2, aux2 = self._sublayer(self.scanned_attn2, x, state2, vq_specs, is_train,
                                         _key(rng, 2))
        metrics = {k: (aux1["metrics"][k] + aux2["metrics"][k]) / 2 for k in aux1["metrics"]}
        return dict(output_features=x, attn_state=[state1, state2],
                    l_commit=aux1["l_commit"] + aux2["l_commit"],
                    l_codebook=aux1["l_codebook"] + aux2["l_codebook"], metrics=metrics)
