"""The decoder stack: `DecoderLayer` and `DecoderModel` (HF `LlamaDecoderLayer` / `LlamaModel`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from weights.config import ModelConfig

from .layers.attention import Attention, KVCache, concrete_int
from .layers.dropout import Dropout
from .layers.mlp import MLP
from .layers.moe import SparseMoeBlock
from .layers.norm import RMSNorm
from .layers.rope import RotaryEmbedding
from .sharding import constrain_activations


@dataclass
class BaseModelOutput:
    """What `DecoderModel` returns; tuples have one entry per layer (hidden states: + 1)."""

    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None  # MoE with output_router_logits: per layer [N, X]


def make_attention_mask(attention_mask: torch.Tensor | None, batch_size: int, query_length: int,
                        key_length: int, past_length: torch.Tensor | int, device: torch.device | None = None,
                        sliding_window: int | None = None) -> torch.Tensor:
    """Boolean keep-mask `[B, 1, T, S]`: causal by cache index, and 2-D padding mask (1 = keep).

    The query at step t of row b sits at cache index `past_length[b] + t` and sees keys at indices
    <= that; slots not yet written lie beyond it and are masked by the same rule. `past_length` is
    one int for every row or `[B]` (each row its own position). `attention_mask` is
    `[B, past_length + T]` (HF's convention) or `[B, S]`. With `sliding_window` w, the query
    at index i sees only indices j with i - j < w, in the full pass and in cached decoding alike.
    """
    past = torch.as_tensor(past_length, device=device).reshape(-1, 1, 1)  # [B or 1, 1, 1]
    q_index = past + torch.arange(query_length, device=device)[:, None]  # [B or 1, T, 1]
    k_index = torch.arange(key_length, device=device)
    keep = k_index <= q_index  # [B or 1, T, S]
    if sliding_window is not None:
        # At most `sliding_window` slots back, by cache index (HF's sliding-window masks).
        keep = keep & (q_index - k_index < sliding_window)
    keep = keep[:, None].expand(batch_size, 1, query_length, key_length)
    if attention_mask is None:
        return keep
    width = attention_mask.shape[-1]
    past_max = concrete_int(past.max())
    allowed = (key_length,) if past_max is None else (past_max + query_length, key_length)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or width not in allowed:
        raise ValueError(f"attention_mask: expected shape [{batch_size}, {allowed[0]}] "
                         f"(past + new tokens), got {list(attention_mask.shape)}")
    padding = attention_mask.to(torch.bool)
    if width < key_length:
        padding = torch.cat([padding, padding.new_zeros(batch_size, key_length - width)], dim=1)
    return keep & padding[:, None, None, :]


def mask_is_causal(attention_mask: torch.Tensor | None, query_length: int, past_length: torch.Tensor | int,
                   sliding_window: int | None = None) -> bool:
    """Whether `make_attention_mask` with these arguments gives exactly the causal mask, query i
    seeing keys j <= i (a fused kernel's `is_causal`, which then skips the mask): no padding mask,
    every row's queries starting at cache index 0, and no window shorter than the query block.
    Decided from Python values alone: a cache's lengths are a tensor, and reading one would cost a
    host sync (and break a compiled graph), so a cached call keeps its mask (False is always safe).
    """
    no_window = sliding_window is None or sliding_window >= query_length
    return attention_mask is None and isinstance(past_length, int) and past_length == 0 and no_window


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a clear error for token ids outside `[0, vocab_size)` (torch would raise deep inside).

    Under `torch.compile` the ids are graph inputs and cannot be checked; callers validate
    before compiling (`generate()` feeds its compiled decode step only tokens it chose).
    """
    if torch.compiler.is_compiling():
        return
    if not input_ids.numel():
        return
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(bad.any()):
        raise ValueError(f"input_ids: token id {int(input_ids[bad][0])} is outside the vocabulary [0, {vocab_size})")


class DecoderLayer(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

    With `sandwich_norm` (Gemma 2, Grok-1) each sublayer's output is normed again before the
    residual add (`post_attention_layernorm` then follows attention, and the MLP sits between
    `pre_feedforward_layernorm` and `post_feedforward_layernorm`). With experts the MLP is a
    `SparseMoeBlock` named `block_sparse_moe` (HF Mixtral).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype: torch.dtype = torch.float32,
                 param_dtype: torch.dtype | None = None):
        super().__init__()
        kw = dict(dtype=dtype, param_dtype=param_dtype or dtype)
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

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor, past_key_value: KVCache | None = None,
                dropout_key: torch.Tensor | None = None, is_causal: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, KVCache | None, torch.Tensor | None]:
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


class DecoderModel(nn.Module):
    """Token embedding, the decoder layers and the final norm (HF `LlamaModel`)."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32,
                 param_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.dtype = dtype  # the activation dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype or dtype)
        # HF's init: normal(0, initializer_range), and a zero row at `pad_token_id`. Built on the
        # meta device then given memory, so the table is drawn once (no N(0, 1) draw first).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         dtype=kw["param_dtype"], device="meta").to_empty(device=torch.get_default_device())
        with torch.no_grad():
            self.embed_tokens.weight.normal_(0.0, config.initializer_range)
            if config.pad_token_id is not None:
                self.embed_tokens.weight[config.pad_token_id] = 0
        self.layers = nn.ModuleList([DecoderLayer(config, i, **kw) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset, param_dtype=kw["param_dtype"])
        self.rotary_emb = RotaryEmbedding(config)
        self.embed_dropout = Dropout(config.hidden_dropout, -1, "embeddings")
        self.gradient_checkpointing = False  # remat each decoder layer in the backward pass

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings `[B, T, E]` in the activation dtype (the table is cast at use, row by
        row); `padding_idx` keeps the pad row's gradient at zero."""
        return self.embed_tokens(input_ids).to(self.dtype)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, output_attentions: bool = False,
                dropout_key: torch.Tensor | None = None) -> BaseModelOutput:
        """`input_ids [B, T]` (or `inputs_embeds [B, T, E]`) -> final hidden states `[B, T, E]`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed(input_ids)
        b, t = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = KVCache.init(self.config, b, t, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        past_length = past_key_values.length if past_key_values is not None else 0
        key_length = past_key_values.key_length(t) if past_key_values is not None else t
        if position_ids is None:
            # Each row continues from its own cache position: `[B, T]` with a cache, else `[1, T]`, so
            # the rotary tables are made once and broadcast over the rows, as HF's are (a table per row
            # costs more to make and more to read in every layer's rotation).
            position_ids = (torch.as_tensor(past_length, device=inputs_embeds.device).reshape(-1, 1)
                            + torch.arange(t, device=inputs_embeds.device))
        windows = self.config.layer_windows
        masks = {w: make_attention_mask(attention_mask, b, t, key_length, past_length, inputs_embeds.device, w)
                 for w in dict.fromkeys(windows)}  # one mask per distinct window (None = global)
        causal = {w: mask_is_causal(attention_mask, t, past_length, w) for w in masks}  # fused kernels skip these

        hidden_states = inputs_embeds
        if self.config.scale_embeddings:
            # Gemma: sqrt(E) is rounded to the activation dtype *before* the multiply, as HF does
            # (bf16: sqrt(2048) = 45.25, not 45.2548); inputs_embeds passed in are scaled too.
            hidden_states = hidden_states * torch.tensor(self.config.hidden_size ** 0.5, dtype=hidden_states.dtype)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden: list[torch.Tensor] = []
        all_attn: list[torch.Tensor] = []
        all_router: list[torch.Tensor] = []
        hidden_states = self.embed_dropout(hidden_states, dropout_key)
        # Remat: each layer's activations are recomputed in the backward pass, not kept (not with a
        # cache, whose in-place writes must happen once; nor without gradients, where nothing is kept).
        remat = self.gradient_checkpointing and past_key_values is None and torch.is_grad_enabled()
        for layer, window in zip(self.layers, windows):
            all_hidden.append(hidden_states)
            hidden_states = constrain_activations(hidden_states)  # the layer boundary: rows over data/fsdp
            run = partial(checkpoint, layer, use_reentrant=False) if remat else layer
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
