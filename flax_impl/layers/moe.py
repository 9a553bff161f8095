"""Mixture of experts (HF `MixtralSparseMoeBlock`): a router picks `num_experts_per_tok` of
`num_local_experts` gated MLPs per token; the output is their routing-weighted sum.

Axes beyond the legend in attention.py: N tokens (B * T), X experts, k experts per token,
I expert width. Routing follows HF Mixtral: softmax over all experts (float32, float64 for
float64 models), top-k, renormalised to sum 1 (`norm_topk_prob`; Grok-1 keeps the raw top-k
probabilities). Ties between equal probabilities go to the lower expert index, in both twins:
the top-k is a stable descending sort, never an unspecified `topk`.

Two dispatches, the same in both twins. "dense" (the reference, the default): every expert runs
on every token in one einsum over the stacked expert weights, and a dense `[N, X]` weight matrix
(zero for unchosen experts) combines them: X / k times the FLOPs of routing, but one formula,
static shapes, and nothing to get wrong. "sparse" (a fast path, `set_moe_dispatch`): each expert
runs on its own tokens only; in the torch twin as HF does (`index_add`, one expert at a time),
here as grouped products over tokens sorted by expert (`jax.lax.ragged_dot`, static shapes under
jit). Tests hold the sparse path to the dense one in each twin. Each expert keeps one `Linear`
per checkpoint tensor (stacked inside the forward), so the converter stays a table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from weights.config import ModelConfig

from .linear import linear
from .mlp import ACT2FN
from .precision import DEFAULT_PRECISION, compute_dtype

DISPATCHES = ("dense", "sparse")


def top_k_lowest_index(probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest of `probs [..., X]` and their indices; equal values go to the lower index."""
    selected = jnp.argsort(probs, axis=-1, stable=True, descending=True)[..., :k]
    return jnp.take_along_axis(probs, selected, axis=-1), selected


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Router logits `[N, X]` -> (routing weights `[N, k]` in the compute dtype, expert indices `[N, k]`)."""
    probs = jax.nn.softmax(router_logits.astype(compute_dtype(router_logits.dtype)), axis=-1)
    weights, selected = top_k_lowest_index(probs, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, selected


def load_balancing_loss(router_logits: tuple[jax.Array, ...], num_experts: int, top_k: int,
                        attention_mask: jax.Array | None = None) -> jax.Array:
    """HF Mixtral's auxiliary loss: `num_experts * sum_x f_x * P_x`, where f is the fraction of
    (token, slot) assignments to expert x and P its mean router probability, over every layer's
    logits `[N, X]` and the real tokens of `attention_mask [B, T]` (all tokens when None).

    In the compute dtype (HF: the logits' dtype); with no real token it is 0, not NaN.
    """
    logits = jnp.concatenate(router_logits, axis=0)
    logits = logits.astype(compute_dtype(logits.dtype))
    probs = jax.nn.softmax(logits, axis=-1)  # [L * N, X]
    _, selected = top_k_lowest_index(probs, top_k)
    expert_mask = jax.nn.one_hot(selected, num_experts, dtype=probs.dtype)  # [L * N, k, X]
    if attention_mask is None:
        keep = jnp.ones((logits.shape[0],), probs.dtype)
    else:
        layers = logits.shape[0] // attention_mask.size
        keep = jnp.tile(attention_mask.reshape(-1), layers).astype(probs.dtype)  # [L * N]
    count = jnp.maximum(keep.sum(), 1)
    tokens_per_expert = (expert_mask * keep[:, None, None]).sum(axis=0) / count  # [k, X]
    router_prob_per_expert = (probs * keep[:, None]).sum(axis=0) / count  # [X]
    return (tokens_per_expert * router_prob_per_expert[None]).sum() * num_experts


def current_token_mask(attention_mask: jax.Array | None, past_length: jax.Array | int, query_length: int
                       ) -> jax.Array | None:
    """The columns of a `[B, past + T]` (or `[B, S]`) padding mask that belong to the T new tokens
    (`past_length`: one int, or `[B]` when each row has its own cache position)."""
    if attention_mask is None or attention_mask.shape[-1] == query_length:
        return attention_mask
    index = jnp.asarray(past_length).reshape(-1, 1) + jnp.arange(query_length)
    return jnp.take_along_axis(attention_mask, jnp.broadcast_to(index, (attention_mask.shape[0], query_length)), axis=1)


class ExpertMLP(nnx.Module):
    """One expert: `w2(act(w1(x)) * w3(x))` (HF `MixtralBlockSparseTop2MLP`), no biases."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype | None = None, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        e, i = config.hidden_size, config.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.w1 = linear(config, e, i, False, **kw)
        self.w2 = linear(config, i, e, False, **kw)
        self.w3 = linear(config, e, i, False, **kw)
        self.act_fn = ACT2FN[config.mlp_activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[N, E] -> [N, E]`."""
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class SparseMoeBlock(nnx.Module):
    """Router `gate` (hidden -> num_local_experts, no bias) and the `experts`."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype | None = None, dispatch: str = "dense",
                 precision: jax.lax.PrecisionLike = DEFAULT_PRECISION, rngs: nnx.Rngs):
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.dtype = dtype
        self.dispatch = dispatch
        self.precision = precision
        self.gate = linear(config, config.hidden_size, self.num_experts, False, dtype=dtype, param_dtype=param_dtype,
                           precision=precision, rngs=rngs)
        self.experts = nnx.List([ExpertMLP(config, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
                                 for _ in range(self.num_experts)])
        self.act_fn = ACT2FN[config.mlp_activation]

    def __call__(self, hidden_states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """hidden `[B, T, E]` -> (output `[B, T, E]`, router logits `[N, X]`)."""
        b, t, e = hidden_states.shape
        x = hidden_states.reshape(-1, e)  # [N, E]
        router_logits = self.gate(x)  # [N, X]
        routing_weights, selected = route(router_logits, self.top_k, self.norm_topk_prob)
        routing_weights = routing_weights.astype(x.dtype)
        if self.dispatch == "sparse":
            out = self.sparse_experts(x, routing_weights, selected)
        else:
            out = self.dense_experts(x, routing_weights, selected)
        return out.reshape(b, t, e), router_logits

    def dense_experts(self, x: jax.Array, routing_weights: jax.Array, selected: jax.Array) -> jax.Array:
        """The reference: every expert on every token `x [N, E]`, weighted by `routing_weights
        [N, k]` for the experts `selected [N, k]` and by zero for the others -> `[N, E]`."""
        # [N, X]: each token's weight for every expert, zero for the experts it was not routed to
        # (a sum with one nonzero term: exact, no product rounds).
        dense_weights = (routing_weights[:, :, None] * jax.nn.one_hot(selected, self.num_experts, dtype=x.dtype)).sum(1)
        # The experts' kernels stacked on a leading X axis, cast at use as `Linear` casts them.
        w1 = jnp.stack([ex.w1.kernel[...] for ex in self.experts]).astype(self.dtype)  # [X, E, I]
        w3 = jnp.stack([ex.w3.kernel[...] for ex in self.experts]).astype(self.dtype)  # [X, E, I]
        w2 = jnp.stack([ex.w2.kernel[...] for ex in self.experts]).astype(self.dtype)  # [X, I, E]
        h = (self.act_fn(jnp.einsum("ne,xei->xni", x, w1, precision=self.precision))
             * jnp.einsum("ne,xei->xni", x, w3, precision=self.precision))
        y = jnp.einsum("xni,xie->xne", h, w2, precision=self.precision)  # every expert on every token
        # Weight then sum over experts, as HF does per expert (products rounded in the dtype).
        return (dense_weights.T[:, :, None] * y).sum(axis=0)

    def sparse_experts(self, x: jax.Array, routing_weights: jax.Array, selected: jax.Array) -> jax.Array:
        """The fast path: each expert on the tokens routed to it only; same arguments and result
        as `dense_experts`. The N * k (token, expert) rows are sorted by expert (stable: tokens
        in order within an expert, as the torch twin's loop visits them), each weight is one
        grouped product over its expert's rows, and the rows are added back to their tokens."""
        k = selected.shape[1]
        flat = selected.reshape(-1)  # [N * k]
        order = jnp.argsort(flat, stable=True)
        token_idx = order // k
        group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)  # [X]
        xs = x[token_idx]  # [N * k, E], grouped by expert
        w1 = jnp.stack([ex.w1.kernel[...] for ex in self.experts]).astype(self.dtype)  # [X, E, I]
        w3 = jnp.stack([ex.w3.kernel[...] for ex in self.experts]).astype(self.dtype)  # [X, E, I]
        w2 = jnp.stack([ex.w2.kernel[...] for ex in self.experts]).astype(self.dtype)  # [X, I, E]
        dot = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes, precision=self.precision)  # noqa: E731
        h = self.act_fn(dot(xs, w1)) * dot(xs, w3)
        y = dot(h, w2) * routing_weights.reshape(-1)[order][:, None]
        return jnp.zeros_like(x).at[token_idx].add(y)


def set_moe_dispatch(model: nnx.Module, dispatch: str) -> nnx.Module:
    """Switch every `SparseMoeBlock` of `model` to `dispatch` ("dense" or "sparse"); returns it."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    for _, module in nnx.iter_modules(model):
        if isinstance(module, SparseMoeBlock):
            module.dispatch = dispatch
    return model
