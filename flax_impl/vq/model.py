"""Transformer: embed -> (+ ScaledSin) -> dropemb -> blocks -> layers -> unblock -> out_ln ->
logits -> x e_scale -> log_softmax. Returns log-probabilities, the new state and the losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from weights.vq.config import TransformerVQConfig
from ..layers.precision import DEFAULT_PRECISION
from .common import dropout_mask, linear, to_dtype
from .embeddings import Embeddings
from .layer import TransformerLayer
from .norm import LayerNorm
from .position import ScaledSin
from .quantizer import VQSpec

__all__ = ["Transformer", "get_blocks_from_sequence", "get_sequence_from_blocks", "get_blocks_of_vq_spec"]


def get_blocks_from_sequence(x: jax.Array, block_len: int) -> jax.Array:
    """[B, P, ...] -> [N, B, L, ...] with N = P / L."""
    bsz, present_len, *suffix = x.shape
    x = x.reshape(bsz, present_len // block_len, block_len, *suffix)
    return jnp.swapaxes(x, 0, 1)


def get_sequence_from_blocks(x: jax.Array) -> jax.Array:
    """[N, B, L, ...] -> [B, N * L, ...]."""
    n_block, bsz, block_len, *suffix = x.shape
    return jnp.swapaxes(x, 0, 1).reshape(bsz, n_block * block_len, *suffix)


def get_blocks_of_vq_spec(vq_spec: VQSpec | None, block_len: int) -> VQSpec | None:
    """The loss mask cut into blocks, [N, B, L]; the scalars shared by all blocks."""
    if vq_spec is None:
        return None
    masks = get_blocks_from_sequence(vq_spec.loss_mask, block_len)
    return VQSpec(vq_spec.n_device, vq_spec.n_block_per_update, masks)


class Transformer(nnx.Module):
    """Transformer-VQ language model (the Flax NNX twin)."""

    def __init__(self, config: TransformerVQConfig, *, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        c = self.config = config
        self.precision = precision
        self.dtype, self.param_dtype = to_dtype(c.dtype), to_dtype(c.param_dtype)
        if not c.no_emb or c.e_tie:
            self.token_embedder = Embeddings(c, precision=precision, rngs=rngs)
        if c.pe_abs:
            self.position_embedder = ScaledSin(c, rngs=rngs)
        self.transformer_layers = nnx.List([TransformerLayer(c, precision=precision, rngs=rngs)
                                            for _ in range(c.n_layer)])
        if c.e_preln:
            self.out_ln = LayerNorm(c, c.d_model)
        if not c.e_tie:
            self.out_proj = nnx.Linear(c.d_model, c.n_vocab, use_bias=True, dtype=self.param_dtype,
                                       param_dtype=self.param_dtype, precision=precision,
                                       kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "normal"),
                                       bias_init=nnx.initializers.zeros, rngs=rngs)

    @staticmethod
    def initial_state(config: TransformerVQConfig, batch_size: int) -> list[list[dict]]:
        """Per layer, [state of sublayer 1, state of sublayer 2]."""
        return [TransformerLayer.initial_state(config, batch_size) for _ in range(config.n_layer)]

    def __call__(self, inputs: jax.Array, state: list, vq_spec: VQSpec | None = None, *,
                 block_len: int | None = None, is_train: bool | None = None,
                 rng: jax.Array | None = None) -> dict:
        """inputs [B, P] token ids ([B, P, E] features when `no_emb`), state from `initial_state`
        or a previous call -> {logprobs [B,P,V], attn_state, l_commit, l_codebook, metrics}.

        `block_len` (default `config.block_len`) must divide P; the output does not depend on it.
        `is_train` (default `config.is_train`) turns on dropout, losses and metrics, and then
        needs `vq_spec`; `rng` (a jax key) drives dropout in train mode.
        """
        c = self.config
        is_train = c.is_train if is_train is None else is_train
        block_len = c.block_len if block_len is None else block_len
        bsz, present_len = inputs.shape[:2]
        c.check_block_len(present_len, block_len)
        if is_train and vq_spec is None:
            raise ValueError("train mode needs a VQSpec (n_device, n_block_per_update, loss_mask)")
        x = inputs.astype(self.dtype) if c.no_emb else self.token_embedder(inputs)
        if c.pe_abs:
            x = x + self.position_embedder(present_len, state[0][0]["pos_offset"])
        if is_train:
            emb_rng = None if rng is None else jax.random.fold_in(rng, 0)
            mask = dropout_mask(tuple(x.shape), c.p_dropemb, x.dtype, emb_rng)
            x = x if mask is None else x * mask
        x = get_blocks_from_sequence(x, block_len)
        vq_specs = get_blocks_of_vq_spec(vq_spec, block_len) if is_train else None
        new_state, aux = [], None
        for i, layer in enumerate(self.transformer_layers):
            layer_rng = None if rng is None else jax.random.fold_in(rng, i + 1)
            out = layer(x, state[i], vq_specs, is_train=is_train, rng=layer_rng)
            new_state.append(out.pop("attn_state"))
            x = out.pop("output_features")
            aux = out if aux is None else dict(
                l_commit=aux["l_commit"] + out["l_commit"], l_codebook=aux["l_codebook"] + out["l_codebook"],
                metrics={k: aux["metrics"][k] + out["metrics"][k] for k in aux["metrics"]})
        x = get_sequence_from_blocks(x)
        if c.e_preln:
            x = self.out_ln(x)
        if c.e_tie:
            x = self.token_embedder.logits(x)
        else:  # the reference computes untied logits in param_dtype ("full-precision logits")
            x = linear(x, self.out_proj.kernel[...], self.out_proj.bias[...], self.param_dtype, precision=self.precision)
        x = x * c.e_scale
        logprobs = jax.nn.log_softmax(x, axis=-1)
        metrics = {k: v / c.n_layer for k, v in aux["metrics"].items()}
        return dict(logprobs=logprobs, attn_state=new_state, l_commit=aux["l_commit"],
                    l_codebook=aux["l_codebook"], metrics=metrics)
