"""Grouped-query attention with a static KV cache.

Axis legend for the whole project: B batch, T query length, S key length, H query heads,
K kv heads, D head dim, E model width, V vocab.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from weights.config import ModelConfig

from .dropout import Dropout
from .linear import linear
from .precision import DEFAULT_PRECISION, compute_dtype
from .rope import apply_rotary_pos_emb


def concrete_int(x: jax.Array | int) -> int | None:
    """`x` as a Python int, or None when it is traced under jit."""
    try:
        return int(x)
    except jax.errors.ConcretizationTypeError:
        return None


@flax.struct.dataclass
class KVCache:
    """Static cache: per layer keys and values `[B, K, S_max, D]`; row b is written at its own
    index `length[b]` (`length` is `[B]` int32).

    All layers of a row write at the same index; `DecoderModel` advances every row once per
    forward pass (the serving runner then holds back its free slots). `generate()` keeps all rows
    at one length; the serving runner gives each slot its own. A pytree, so it passes through
    `jax.jit`. Outside jit a write past the capacity grows the buffers (a slow path; preallocate
    with `init`); under jit the capacity must suffice.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array  # [B] int32

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_length: int, *,
             dtype: jnp.dtype = jnp.float32, device: jax.Device | None = None,
             num_key_value_heads: int | None = None) -> "KVCache":
        """An empty cache with room for `max_length` positions in each of `batch_size` rows, for
        `num_key_value_heads` kv heads (default: the config's; fewer for a model whose attention
        computes only some heads per process, `sharding.local_kv_heads`)."""
        heads = config.resolved_num_key_value_heads if num_key_value_heads is None else num_key_value_heads
        shape = (batch_size, heads, max_length, config.resolved_head_dim)
        layers = range(config.num_hidden_layers)
        return cls(tuple(jnp.zeros(shape, dtype, device=device) for _ in layers),
                   tuple(jnp.zeros(shape, dtype, device=device) for _ in layers),
                   jnp.zeros(batch_size, jnp.int32, device=device))

    @property
    def capacity(self) -> int:
        """Positions the buffers can hold."""
        return self.keys[0].shape[2]

    def key_length(self, num_new: int) -> int:
        """Key axis length S after writing `num_new` more positions (the capacity under jit)."""
        start = concrete_int(jnp.max(self.length))
        return self.capacity if start is None else max(self.capacity, start + num_new)

    def update(self, key: jax.Array, value: jax.Array, layer_idx: int
               ) -> tuple["KVCache", jax.Array, jax.Array]:
        """Write key/value `[B, K, T, D]`, row b at indices `length[b]` ... `length[b] + T - 1`;
        return the new cache and the layer's full buffers."""
        keys, values = list(self.keys), list(self.values)
        start = concrete_int(jnp.max(self.length))
        capacity = self.keys[layer_idx].shape[2]  # this layer's: the layers before it may have grown already
        if start is not None and start + key.shape[2] > capacity:
            grow = ((0, 0), (0, 0), (0, start + key.shape[2] - capacity), (0, 0))
            keys[layer_idx], values[layer_idx] = jnp.pad(keys[layer_idx], grow), jnp.pad(values[layer_idx], grow)

        def write(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:  # one row: [K, S, D]
            # Every index must share the int32 dtype of `length`; a bare 0 is int64 under x64.
            zero = jnp.zeros((), index.dtype)
            return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (zero, index, zero))

        keys[layer_idx] = jax.vmap(write)(keys[layer_idx], key, self.length)
        values[layer_idx] = jax.vmap(write)(values[layer_idx], value, self.length)
        return self.replace(keys=tuple(keys), values=tuple(values)), keys[layer_idx], values[layer_idx]

    def advance(self, num_tokens: int) -> "KVCache":
        """Move every row's write position past `num_tokens` newly written positions."""
        return self.replace(length=self.length + num_tokens)


def group_query_heads(x: jax.Array, num_key_value_groups: int) -> jax.Array:
    """`[B, H, T, X] -> [B, K, G * T, X]`: the G = H / K query heads sharing a kv head, stacked as
    that head's rows (heads k * G to k * G + G - 1 use kv head k, the pairing of HF's `repeat_kv`).
    A free reshape, so one matmul per kv head scores its whole group; `repeat_kv` would copy every
    cached key and value G times, on every decoding step."""
    b, h, t, d = x.shape
    return x.reshape(b, h // num_key_value_groups, num_key_value_groups * t, d)


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """`cap * tanh(x / cap)`: smoothly bounds logits to (-cap, cap) (Gemma 2, Grok-1)."""
    return jnp.tanh(x / cap) * cap


def attention_forward(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                      scaling: float, num_key_value_groups: int, softcap: float | None = None,
                      dropout: Callable[[jax.Array], jax.Array] | None = None,
                      precision: jax.lax.PrecisionLike = DEFAULT_PRECISION) -> tuple[jax.Array, jax.Array]:
    """Eager attention. q `[B, H, T, D]`, k/v `[B, K, S, D]`, boolean keep-mask `[B, 1, T, S]`;
    `softcap` caps the scores before the mask (HF Gemma 2); `dropout` (train mode) drops
    attention probabilities after the softmax, as HF does.

    Returns the output `[B, H, T, D]` and the weights `[B, H, T, S]`.
    """
    b, h, t, d = query.shape
    grouped = group_query_heads(query, num_key_value_groups)  # [B, K, G * T, D]
    scores = jnp.matmul(grouped, jnp.swapaxes(key, 2, 3), precision=precision).reshape(b, h, t, -1) * scaling
    if softcap is not None:
        scores = soft_cap(scores, softcap)  # in the activation dtype, before the upcast, as HF does
    cdtype = compute_dtype(query.dtype)
    # Masked scores take the most negative finite value, not -inf: a row with no visible key
    # (a padding query) then gets uniform weights instead of NaN, identically in both twins.
    scores = jnp.where(mask, scores.astype(cdtype), jnp.finfo(cdtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
    if dropout is not None:
        weights = dropout(weights)
    out = jnp.matmul(group_query_heads(weights, num_key_value_groups), value, precision=precision)
    return out.reshape(b, h, t, d), weights


def attention_fast(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                   scaling: float, num_key_value_groups: int, is_causal: bool = False) -> tuple[jax.Array, None]:
    """The fused path (`jax.nn.dot_product_attention`): `attention_forward`'s output without its
    weights, held to it by the tolerance table (`tests/twins/test_attention_fast.py`).

    With `is_causal` (the model's `mask_is_causal`: `mask` is exactly query i seeing keys j <= i)
    the function takes its own causal rule instead of the mask (cuDNN then skips the blocks above
    the diagonal; XLA builds the same mask from iotas). Otherwise the keep-mask goes in as a
    mask: the function fills masked scores with a large finite negative, so a padding query (no
    visible key) gets uniform weights, as on the eager path, not NaN. It takes `[B, T, H, D]`,
    hence the swaps, and groups the kv heads itself.
    """
    attn_mask = None
    if not is_causal:
        attn_mask = mask
    out = jax.nn.dot_product_attention(query.swapaxes(1, 2), key.swapaxes(1, 2), value.swapaxes(1, 2),
                                       mask=attn_mask, is_causal=is_causal, scale=scaling)
    return out.swapaxes(1, 2), None


class Attention(nnx.Module):
    """Multi-head attention with H query heads sharing K kv heads (MHA: K = H, MQA: K = 1).

    Family switches: q/k/v bias (`attention_qkv_bias`), o bias (`attention_bias`), the score
    scale (`query_scaling`) and score soft-capping (`attn_logit_softcapping`). A sliding window
    arrives in the mask the model builds for this layer.

    `attn_implementation` "eager" (the default, the reference every check compares) or "fast"
    (`attention_fast`; no weights: the layer returns None for them) in float32 and bfloat16.
    Soft-capped scores, dropout (a `dropout_key`), float64 and float16 always take the eager
    path: the fused kernels cannot cap or drop by our masks, jax's takes its softmax in float32
    and its float16 dot fails to compile on the CPU.
    Set it with `set_attn_implementation`.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype | None = None, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        self.head_dim = config.resolved_head_dim
        self.num_key_value_groups = config.num_key_value_groups
        self.scaling = config.query_scaling
        self.softcap = config.attn_logit_softcapping
        self.attn_implementation = "eager"
        e, h, k, d = config.hidden_size, config.num_attention_heads, config.resolved_num_key_value_heads, self.head_dim
        self.precision = precision
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        bias = config.attention_qkv_bias
        self.q_proj = linear(config, e, h * d, bias, **kw)
        self.k_proj = linear(config, e, k * d, bias, **kw)
        self.v_proj = linear(config, e, k * d, bias, **kw)
        self.o_proj = linear(config, h * d, e, config.attention_bias, **kw)
        self.attention_dropout = Dropout(config.attention_dropout, layer_idx, "attention")

    def __call__(self, hidden_states: jax.Array, position_embeddings: tuple[jax.Array, jax.Array],
                 attention_mask: jax.Array, past_key_value: KVCache | None = None,
                 dropout_key: jax.Array | None = None, is_causal: bool = False
                 ) -> tuple[jax.Array, jax.Array, KVCache | None]:
        """hidden `[B, T, E]`, (cos, sin) `[B or 1, T, D]`, keep-mask `[B, 1, T, S]` ->
        (output `[B, T, E]`, weights `[B, H, T, S]`, cache). `is_causal`: the keep-mask is the
        plain causal one (the model's `mask_is_causal`), which the fast path then need not read."""
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        query = self.q_proj(hidden_states).reshape(shape).swapaxes(1, 2)  # [B, H, T, D]
        key = self.k_proj(hidden_states).reshape(shape).swapaxes(1, 2)  # [B, K, T, D]
        value = self.v_proj(hidden_states).reshape(shape).swapaxes(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_value is not None:
            past_key_value, key, value = past_key_value.update(key, value, self.layer_idx)
        # The fused kernels cannot cap scores or drop weights by this project's masks (dropout_key).
        fast = self.attn_implementation == "fast" and self.softcap is None and dropout_key is None
        if fast and query.dtype in (jnp.float32, jnp.bfloat16):
            out, weights = attention_fast(query, key, value, attention_mask, self.scaling, self.num_key_value_groups,
                                          is_causal)
        else:
            out, weights = attention_forward(query, key, value, attention_mask, self.scaling,
                                             self.num_key_value_groups, self.softcap,
                                             partial(self.attention_dropout, dropout_key=dropout_key),
                                             precision=self.precision)
        out = out.swapaxes(1, 2).reshape(b, t, -1)
        return self.o_proj(out), weights, past_key_value


def set_attn_implementation(model: nnx.Module, name: str) -> nnx.Module:
    """Switch every `Attention` of `model` to `name` ("eager" or "fast"); returns `model`."""
    if name not in ("eager", "fast"):
        raise ValueError(f"attn_implementation must be 'eager' or 'fast', got {name!r}")
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Attention):
            module.attn_implementation = name
    return model
