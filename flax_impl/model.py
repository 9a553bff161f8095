"""The decoder stack: `DecoderLayer` and `DecoderModel` (HF `LlamaDecoderLayer` / `LlamaModel`)."""

from __future__ import annotations

import contextlib
import contextvars
from functools import partial
from typing import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from weights.config import ModelConfig

from .layers.attention import Attention, KVCache, concrete_int
from .layers.dropout import Dropout
from .layers.mlp import MLP
from .layers.moe import SparseMoeBlock
from .layers.norm import RMSNorm
from .layers.precision import DEFAULT_PRECISION
from .layers.rope import RotaryEmbedding
from .sharding import constrain_activations


@flax.struct.dataclass
class BaseModelOutput:
    """What `DecoderModel` returns; tuples have one entry per layer (hidden states: + 1)."""

    last_hidden_state: jax.Array
    past_key_values: KVCache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    router_logits: tuple[jax.Array, ...] | None = None  # MoE with output_router_logits: per layer [N, X]


def make_attention_mask(attention_mask: jax.Array | None, batch_size: int, query_length: int,
                        key_length: int, past_length: jax.Array | int, sliding_window: int | None = None) -> jax.Array:
    """Boolean keep-mask `[B, 1, T, S]`: causal by cache index, and 2-D padding mask (1 = keep).

    The query at step t of row b sits at cache index `past_length[b] + t` and sees keys at indices
    <= that; slots not yet written lie beyond it and are masked by the same rule. `past_length` is
    one int for every row or `[B]` (each row its own position). `attention_mask` is
    `[B, past_length + T]` (HF's convention) or `[B, S]`. With `sliding_window` w, the query
    at index i sees only indices j with i - j < w, in the full pass and in cached decoding alike.
    """
    past = jnp.asarray(past_length).reshape(-1, 1, 1)  # [B or 1, 1, 1]
    q_index = past + jnp.arange(query_length)[:, None]  # [B or 1, T, 1]
    k_index = jnp.arange(key_length)
    keep = k_index <= q_index  # [B or 1, T, S]
    if sliding_window is not None:
        # At most `sliding_window` slots back, by cache index (HF's sliding-window masks).
        keep = keep & (q_index - k_index < sliding_window)
    keep = jnp.broadcast_to(keep[:, None], (batch_size, 1, query_length, key_length))
    if attention_mask is None:
        return keep
    width = attention_mask.shape[-1]
    past_max = concrete_int(jnp.max(past))
    allowed = (key_length,) if past_max is None else (past_max + query_length, key_length)
    if attention_mask.ndim != 2 or attention_mask.shape[0] != batch_size or width not in allowed:
        raise ValueError(f"attention_mask: expected shape [{batch_size}, {allowed[0]}] "
                         f"(past + new tokens), got {list(attention_mask.shape)}")
    padding = attention_mask.astype(bool)
    if width < key_length:
        padding = jnp.concatenate([padding, jnp.zeros((batch_size, key_length - width), bool)], axis=1)
    return keep & padding[:, None, None, :]


def mask_is_causal(attention_mask: jax.Array | None, query_length: int, past_length: jax.Array | int,
                   sliding_window: int | None = None) -> bool:
    """Whether `make_attention_mask` with these arguments gives exactly the causal mask, query i
    seeing keys j <= i (a fused kernel's `is_causal`, which then skips the mask): no padding mask,
    every row's queries starting at cache index 0, and no window shorter than the query block.
    Decided from Python values alone: a cache's lengths are an array, and reading one would cost a
    host sync (and is impossible under jit), so a cached call keeps its mask (False is always safe).
    """
    no_window = sliding_window is None or sliding_window >= query_length
    return attention_mask is None and isinstance(past_length, int) and past_length == 0 and no_window


def check_token_ids(input_ids: jax.Array, vocab_size: int) -> None:
    """Raise a clear error for token ids outside `[0, vocab_size)` (JAX would silently clamp).

    Under jit the ids are traced and cannot be checked; callers validate before compiling.
    """
    if isinstance(input_ids, jax.core.Tracer):
        return
    if not input_ids.size:
        return
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(bad.any()):
        raise ValueError(f"input_ids: token id {int(input_ids[bad][0])} is outside the vocabulary [0, {vocab_size})")


def same_structure(layers: Sequence[nnx.Module]) -> str | None:
    """None when every layer has the first one's structure (module tree, static attributes other
    than its index, parameter shapes and dtypes), else which layer differs and how."""
    first = nnx.graphdef(layers[0])
    first_attrs = [a for a in first.attributes if a[0] != "layer_idx"]
    first_leaves = [(x.shape, x.dtype) for x in jax.tree.leaves(nnx.state(layers[0]))]
    for i, layer in enumerate(layers[1:], 1):
        graphdef = nnx.graphdef(layer)
        if graphdef.nodes != first.nodes or [a for a in graphdef.attributes if a[0] != "layer_idx"] != first_attrs:
            return f"layer {i}'s modules or static attributes differ from layer 0's"
        if [(x.shape, x.dtype) for x in jax.tree.leaves(nnx.state(layer))] != first_leaves:
            return f"layer {i}'s parameter shapes or dtypes differ from layer 0's"
    return None


# The stacks of the `reading_layer_stack` blocks being traced: (the layers' parameter arrays, their
# stack). A forward finds its layers' stack by the identity of those arrays (tracers under jit), so a
# stack is never read for parameters other than the ones it was built from.
_LAYER_STACKS: contextvars.ContextVar[tuple[tuple[tuple[jax.Array, ...], nnx.State], ...]] = \
    contextvars.ContextVar("layer_stacks", default=())


def _check_scannable(layers: Sequence[nnx.Module]) -> None:
    """Raise, saying which layer differs and how, unless every layer has layer 0's structure."""
    why = same_structure(layers)
    if why is not None:
        raise ValueError(f"scan_layers: {why}; a scan needs layers of one kind (set model.scan_layers = False)")


def stack_layers(layers: Sequence[nnx.Module]) -> nnx.State:
    """The layers' parameters stacked to `[L, ...]` (layer 0's state tree, each leaf one array for
    every layer): what `scan_decoder_layers` scans over. One copy of the layers' weights."""
    _check_scannable(layers)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(layer) for layer in layers))


@contextlib.contextmanager
def reading_layer_stack(model: DecoderModel, stack: nnx.State | None = None) -> Iterator[None]:
    """Within the block, every scanned forward of `model` (`scan_layers`) reads one stack of its
    layers' parameters instead of stacking them at each call: `stack` (`stack_layers` of the same
    weights, e.g. built once outside jit and passed in) or, when None, one built here on entry.

    Used inside a jitted program around several forwards, e.g. `generate()`'s prefill and decode
    loop: the stack is built once, before the loop, and the loop's body reads it as a constant (XLA
    does not hoist a stack built inside the body). Without `scan_layers` it does nothing.
    """
    if not model.scan_layers:
        yield
        return
    if stack is None:
        stack = stack_layers(model.layers)
    else:
        _check_scannable(model.layers)
        first = nnx.state(model.layers[0])
        shapes = [(len(model.layers),) + tuple(x.shape) for x in jax.tree.leaves(first)]
        if jax.tree.structure(stack) != jax.tree.structure(first) or [tuple(x.shape) for x in jax.tree.leaves(stack)] != shapes:
            raise ValueError(f"reading_layer_stack: the stack is not stack_layers() of this model's "
                             f"{len(model.layers)} layers (leaf shapes {[tuple(x.shape) for x in jax.tree.leaves(stack)]}, "
                             f"expected {shapes})")
    leaves = tuple(x for layer in model.layers for x in jax.tree.leaves(nnx.state(layer)))
    token = _LAYER_STACKS.set(_LAYER_STACKS.get() + ((leaves, stack),))
    try:
        yield
    finally:
        _LAYER_STACKS.reset(token)


def _stack_of(layers: Sequence[nnx.Module]) -> nnx.State | None:
    """The stack of an enclosing `reading_layer_stack` block built from exactly these parameter
    arrays, or None."""
    leaves = tuple(x for layer in layers for x in jax.tree.leaves(nnx.state(layer)))
    for held, stack in reversed(_LAYER_STACKS.get()):
        if len(held) == len(leaves) and all(a is b for a, b in zip(held, leaves)):
            return stack
    return None


def scan_decoder_layers(layers: Sequence[nnx.Module], hidden_states: jax.Array, position_embeddings: tuple[jax.Array, jax.Array],
                        masks: Sequence[jax.Array], past_key_values: KVCache | None,
                        output_hidden_states: bool, output_attentions: bool, is_causal: bool = False
                        ) -> tuple[jax.Array, list[jax.Array], list[jax.Array | None], list[jax.Array | None], KVCache | None]:
    """The layers' loop as one `jax.lax.scan`: XLA then compiles one layer, not `L` copies of it.

    The layers' parameters are stacked to `[L, ...]` (`stack_layers`: the module tree and the
    checkpoint keep one array per parameter per layer): read from an enclosing `reading_layer_stack`
    block, else stacked here, one copy per call. The body merges layer 0's graph definition with
    layer l's parameters, so every layer must have layer 0's structure (`same_structure`). Layers
    differ only by their mask (sliding or global window: `masks[l]`) and their cache, stacked to
    `[L, B, K, S, D]` for the scan and handed back per layer. `is_causal`: every layer's mask is the
    plain causal one (`mask_is_causal`; one program takes it for all layers). Returns what the loop
    collects: (hidden `[B, T, E]`, per-layer inputs, attention weights, router logits, cache).
    """
    params = _stack_of(layers)
    if params is None:
        params = stack_layers(layers)
    graphdef = nnx.graphdef(layers[0])
    # One array per distinct mask (sliding / global), each layer picking its own by index.
    distinct = list({id(m): m for m in masks}.values())
    pick = jnp.asarray([next(j for j, d in enumerate(distinct) if d is m) for m in masks], jnp.int32)
    stacked_masks = jnp.stack(distinct)
    caches = None if past_key_values is None else (jnp.stack(past_key_values.keys), jnp.stack(past_key_values.values))

    def body(hidden: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
        state, index, cache = xs
        layer_input = hidden
        hidden = constrain_activations(hidden)  # the layer boundary: rows over data/fsdp
        layer_cache = None if cache is None else KVCache((cache[0],), (cache[1],), past_key_values.length)
        hidden, attn_weights, layer_cache, router_logits = nnx.merge(graphdef, state)(
            hidden, position_embeddings, stacked_masks[index], layer_cache, None, is_causal)
        cache = None if layer_cache is None else (layer_cache.keys[0], layer_cache.values[0])
        return hidden, (layer_input if output_hidden_states else None,
                        attn_weights if output_attentions else None, router_logits, cache)

    hidden_states, (inputs, attn, router, cache) = jax.lax.scan(body, hidden_states, (params, pick, caches))
    n = len(layers)
    unstack = lambda x: [None] * n if x is None else list(x)  # noqa: E731
    if cache is not None:
        past_key_values = past_key_values.replace(keys=tuple(cache[0]), values=tuple(cache[1]))
    return hidden_states, unstack(inputs), unstack(attn), unstack(router), past_key_values


class DecoderLayer(nnx.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

    With `sandwich_norm` (Gemma 2, Grok-1) each sublayer's output is normed again before the
    residual add (`post_attention_layernorm` then follows attention, and the MLP sits between
    `pre_feedforward_layernorm` and `post_feedforward_layernorm`). With experts the MLP is a
    `SparseMoeBlock` named `block_sparse_moe` (HF Mixtral).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype | None = None, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype or dtype, precision=precision, rngs=rngs)
        self.self_attn = Attention(config, layer_idx, **kw)
        self.attention_output_dropout = Dropout(config.hidden_dropout, layer_idx, "attention_output")
        self.mlp_output_dropout = Dropout(config.hidden_dropout, layer_idx, "mlp_output")
        self.is_moe = config.is_moe
        if self.is_moe:
            self.block_sparse_moe = SparseMoeBlock(config, **kw)
        else:
            self.mlp = MLP(config, **kw)
        norm = dict(eps=config.rms_norm_eps, unit_offset=config.norm_unit_offset, param_dtype=param_dtype or dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.sandwich_norm = config.sandwich_norm
        if self.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)

    def __call__(self, hidden_states: jax.Array, position_embeddings: tuple[jax.Array, jax.Array],
                 attention_mask: jax.Array, past_key_value: KVCache | None = None,
                 dropout_key: jax.Array | None = None, is_causal: bool = False
                 ) -> tuple[jax.Array, jax.Array, KVCache | None, jax.Array | None]:
        """hidden `[B, T, E]` -> (hidden `[B, T, E]`, attention weights `[B, H, T, S]`, cache,
        router logits `[B * T, X]` or None without experts). `is_causal`: see `mask_is_causal`."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, attn_weights, past_key_value = self.self_attn(
            hidden_states, position_embeddings, attention_mask, past_key_value, dropout_key, is_causal)
        if self.sandwich_norm:
            hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + self.attention_output_dropout(hidden_states, dropout_key)
        residual = hidden_states
        if self.sandwich_norm:
            hidden_states = self.pre_feedforward_layernorm(hidden_states)
        else:
            hidden_states = self.post_attention_layernorm(hidden_states)
        router_logits = None
        if self.is_moe:
            hidden_states, router_logits = self.block_sparse_moe(hidden_states)
        else:
            hidden_states = self.mlp(hidden_states)
        if self.sandwich_norm:
            hidden_states = self.post_feedforward_layernorm(hidden_states)
        return residual + self.mlp_output_dropout(hidden_states, dropout_key), attn_weights, past_key_value, router_logits


class DecoderModel(nnx.Module):
    """Token embedding, the decoder layers and the final norm (HF `LlamaModel`)."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype | None = None, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype  # the activation dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype or dtype, precision=precision, rngs=rngs)
        # HF's init: normal(0, initializer_range), and a zero row at `pad_token_id`. Embed's own
        # dtype is the table's: the cast to the activation dtype is written in `embed`.
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=kw["param_dtype"],
                                      param_dtype=kw["param_dtype"],
                                      embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
        if config.pad_token_id is not None:
            table = self.embed_tokens.embedding
            table[...] = table[...].at[config.pad_token_id].set(0)
        self.layers = nnx.List([DecoderLayer(config, i, **kw) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset, param_dtype=kw["param_dtype"])
        self.rotary_emb = RotaryEmbedding(config)
        self.embed_dropout = Dropout(config.hidden_dropout, -1, "embeddings")
        self.gradient_checkpointing = False  # remat each decoder layer in the backward pass
        # Flax only: run the layers as one lax.scan over a stacked copy of their parameters, so XLA
        # compiles one layer instead of every one (`scan_layers`); off = the unrolled reference loop.
        self.scan_layers = False

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings `[B, T, E]` in the activation dtype (the table is cast at use, row by
        row); like torch's `padding_idx`, the pad row gets no gradient from the positions that
        look it up."""
        embeds = self.embed_tokens(input_ids).astype(self.dtype)
        if self.config.pad_token_id is None:
            return embeds
        is_pad = (input_ids == self.config.pad_token_id)[..., None]
        return jnp.where(is_pad, jax.lax.stop_gradient(embeds), embeds)

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, past_key_values: KVCache | None = None,
                 inputs_embeds: jax.Array | None = None, use_cache: bool = False,
                 output_hidden_states: bool = False, output_attentions: bool = False,
                 dropout_key: jax.Array | None = None) -> BaseModelOutput:
        """`input_ids [B, T]` (or `inputs_embeds [B, T, E]`) -> final hidden states `[B, T, E]`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed(input_ids)
        b, t = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = KVCache.init(self.config, b, t, dtype=inputs_embeds.dtype)
        past_length = past_key_values.length if past_key_values is not None else 0
        key_length = past_key_values.key_length(t) if past_key_values is not None else t
        if position_ids is None:
            # Each row continues from its own cache position: `[B, T]` with a cache, else `[1, T]`, so
            # the rotary tables are made once and broadcast over the rows, as HF's are (a table per row
            # costs more to make and more to read in every layer's rotation).
            position_ids = jnp.asarray(past_length).reshape(-1, 1) + jnp.arange(t, dtype=jnp.int32)
        windows = self.config.layer_windows
        masks = {w: make_attention_mask(attention_mask, b, t, key_length, past_length, w)
                 for w in dict.fromkeys(windows)}  # one mask per distinct window (None = global)
        causal = {w: mask_is_causal(attention_mask, t, past_length, w) for w in masks}  # fused kernels skip these

        hidden_states = inputs_embeds
        if self.config.scale_embeddings:
            # Gemma: sqrt(E) is rounded to the activation dtype *before* the multiply, as HF does
            # (bf16: sqrt(2048) = 45.25, not 45.2548); inputs_embeds passed in are scaled too.
            hidden_states = hidden_states * jnp.asarray(self.config.hidden_size ** 0.5, dtype=hidden_states.dtype)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden: list[jax.Array] = []
        all_attn: list[jax.Array] = []
        all_router: list[jax.Array] = []
        hidden_states = self.embed_dropout(hidden_states, dropout_key)
        # Remat: each layer's activations are recomputed in the backward pass, not kept (not with a
        # cache: decoding keeps nothing for a backward pass).
        remat = self.gradient_checkpointing and past_key_values is None
        # The scan runs one program for every layer: not with per-layer dropout masks or remat, nor
        # when the cache must grow first (outside jit; the loop grows it layer by layer).
        grows = past_key_values is not None and key_length > past_key_values.capacity
        scanned = self.scan_layers and not remat and dropout_key is None and not grows
        if scanned:
            hidden_states, all_hidden, all_attn, all_router, past_key_values = scan_decoder_layers(
                self.layers, hidden_states, position_embeddings, [masks[w] for w in windows], past_key_values,
                output_hidden_states, output_attentions, all(causal[w] for w in windows))
        for layer, window in zip(self.layers if not scanned else (), windows):
            all_hidden.append(hidden_states)
            hidden_states = constrain_activations(hidden_states)  # the layer boundary: rows over data/fsdp
            # `is_causal` (argument 6 with the layer) stays a Python bool: it chooses code, not values.
            run = partial(nnx.remat(DecoderLayer.__call__, static_argnums=6), layer) if remat else layer
            hidden_states, attn_weights, past_key_values, router_logits = run(
                hidden_states, position_embeddings, masks[window], past_key_values, dropout_key, causal[window])
            all_attn.append(attn_weights)
            all_router.append(router_logits)
        hidden_states = self.norm(hidden_states)
        # HF's convention: the last entry is the *normed* output, replacing the last layer's raw one.
        all_hidden.append(hidden_states)
        if past_key_values is not None:
            past_key_values = past_key_values.advance(t)
        return BaseModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            router_logits=tuple(all_router) if self.config.is_moe and self.config.output_router_logits else None,
        )
