"""Grouped-query attention with a static KV cache.

Axis legend for the whole project: B batch, T query length, S key length, H query heads,
K kv heads, D head dim, E model width, V vocab.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Callable

import torch
from torch import nn

from weights.config import ModelConfig

from .dropout import Dropout
from .linear import linear
from .precision import compute_dtype
from .rope import apply_rotary_pos_emb


def concrete_int(x: torch.Tensor | int) -> int | None:
    """`x` as a Python int, or None while `torch.compile` traces it (the compiled decode step):
    there the value is a graph input and reading it would break the graph."""
    if torch.compiler.is_compiling():
        return None
    return int(x)


class KVCache:
    """Static cache: per layer keys and values `[B, K, S_max, D]`; row b is written at its own
    index `length[b]` (`length` is `[B]` int64).

    All layers of a row write at the same index; `DecoderModel` advances every row once per
    forward pass (the serving runner then holds back its free slots). `generate()` keeps all rows
    at one length; the serving runner gives each slot its own. A write past the capacity grows
    the buffers (a slow path; preallocate with `init`); under `torch.compile` the capacity must
    suffice.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: torch.Tensor):
        self.keys = keys
        self.values = values
        self.length = length

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_length: int, *,
             dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
             num_key_value_heads: int | None = None) -> "KVCache":
        """An empty cache with room for `max_length` positions in each of `batch_size` rows, for
        `num_key_value_heads` kv heads (default: the config's; fewer for a model whose attention
        computes only some heads per process, `sharding.local_kv_heads`)."""
        heads = config.resolved_num_key_value_heads if num_key_value_heads is None else num_key_value_heads
        shape = (batch_size, heads, max_length, config.resolved_head_dim)
        layers = range(config.num_hidden_layers)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
                   torch.zeros(batch_size, dtype=torch.int64, device=device))

    @property
    def capacity(self) -> int:
        """Positions the buffers can hold."""
        return self.keys[0].shape[2]

    def key_length(self, num_new: int) -> int:
        """Key axis length S after writing `num_new` more positions (the capacity under compile)."""
        start = concrete_int(self.length.max())
        return self.capacity if start is None else max(self.capacity, start + num_new)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int
               ) -> tuple["KVCache", torch.Tensor, torch.Tensor]:
        """Write key/value `[B, K, T, D]`, row b at indices `length[b]` ... `length[b] + T - 1`;
        return the cache and the layer's full buffers."""
        b, _, t, _ = key.shape
        start = concrete_int(self.length.max())
        capacity = self.keys[layer_idx].shape[2]  # this layer's: the layers before it may have grown already
        if start is not None and start + t > capacity:
            grow = start + t - capacity
            pad = lambda x: torch.cat([x, x.new_zeros(x.shape[:2] + (grow,) + x.shape[3:])], dim=2)  # noqa: E731
            self.keys[layer_idx], self.values[layer_idx] = pad(self.keys[layer_idx]), pad(self.values[layer_idx])
        rows = torch.arange(b, device=key.device)[:, None]  # [B, 1]
        index = self.length[:, None] + torch.arange(t, device=key.device)  # [B, T]
        # Advanced indices around a slice put their axes first: the target is [B, T, K, D].
        self.keys[layer_idx][rows, :, index] = key.transpose(1, 2)
        self.values[layer_idx][rows, :, index] = value.transpose(1, 2)
        return self, self.keys[layer_idx], self.values[layer_idx]

    def advance(self, num_tokens: int) -> "KVCache":
        """Move every row's write position past `num_tokens` newly written positions."""
        self.length = self.length + num_tokens
        return self


def group_query_heads(x: torch.Tensor, num_key_value_groups: int) -> torch.Tensor:
    """`[B, H, T, X] -> [B, K, G * T, X]`: the G = H / K query heads sharing a kv head, stacked as
    that head's rows (heads k * G to k * G + G - 1 use kv head k, the pairing of HF's `repeat_kv`).
    A free reshape, so one matmul per kv head scores its whole group; `repeat_kv` would copy every
    cached key and value G times, on every decoding step."""
    b, h, t, d = x.shape
    return x.reshape(b, h // num_key_value_groups, num_key_value_groups * t, d)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """`cap * tanh(x / cap)`: smoothly bounds logits to (-cap, cap) (Gemma 2, Grok-1)."""
    return torch.tanh(x / cap) * cap


def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                      scaling: float, num_key_value_groups: int, softcap: float | None = None,
                      dropout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention. q `[B, H, T, D]`, k/v `[B, K, S, D]`, boolean keep-mask `[B, 1, T, S]`;
    `softcap` caps the scores before the mask (HF Gemma 2); `dropout` (train mode) drops
    attention probabilities after the softmax, as HF does.

    Returns the output `[B, H, T, D]` and the weights `[B, H, T, S]`.
    """
    b, h, t, d = query.shape
    grouped = group_query_heads(query, num_key_value_groups)  # [B, K, G * T, D]
    scores = torch.matmul(grouped, key.transpose(2, 3)).reshape(b, h, t, -1) * scaling
    if softcap is not None:
        scores = soft_cap(scores, softcap)  # in the activation dtype, before the upcast, as HF does
    cdtype = compute_dtype(query.dtype)
    # Masked scores take the most negative finite value, not -inf: a row with no visible key
    # (a padding query) then gets uniform weights instead of NaN, identically in both twins.
    scores = scores.to(cdtype).masked_fill(~mask, torch.finfo(cdtype).min)
    weights = torch.softmax(scores, dim=-1).to(query.dtype)
    if dropout is not None:
        weights = dropout(weights)
    out = torch.matmul(group_query_heads(weights, num_key_value_groups), value)
    return out.reshape(b, h, t, d), weights


def attention_fast(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                   scaling: float, num_key_value_groups: int, is_causal: bool = False) -> tuple[torch.Tensor, None]:
    """The fused path (`scaled_dot_product_attention`): `attention_forward`'s output without its
    weights, held to it by the tolerance table (`tests/twins/test_attention_fast.py`).

    With `is_causal` (the model's `mask_is_causal`: `mask` is exactly query i seeing keys j <= i)
    the kernel takes its own causal rule instead of the mask and skips the blocks above the
    diagonal. Otherwise the keep-mask becomes an additive bias of the most negative finite value,
    as the eager path masks: a boolean mask would give a padding query (no visible key) NaN
    instead of uniform weights, and the NaN would reach every later layer through that row's keys.
    """
    attn_mask = None
    if not is_causal:
        attn_mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                                     scale=scaling, enable_gqa=num_key_value_groups > 1)
    return out, None


def _attention_dropout(attention: "Attention", dropout_key: torch.Tensor | None
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    # The layer's attention-map dropout. Under tensor parallelism (`sharding.shard_model` cuts the
    # q projection's output along `tensor`, whole heads per rank) this rank's map `[B, H/n, T, S]`
    # holds heads rank * H/n on of the one-process `[B, H, T, S]`, whose masks it must draw. A mask
    # row is the flat index of the leading axes, so those heads of batch row b are the rows of batch
    # row b * n + rank of a `[B * n, H/n, T, S]` mask: each batch row drawn at that offset.
    dropout = partial(attention.attention_dropout, dropout_key=dropout_key)
    weight = attention.q_proj.weight
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists unless it was imported
    names = (weight.device_mesh.mesh_dim_names or ()) if dtensor and isinstance(weight, dtensor.DTensor) else ()
    if dropout_key is None or "tensor" not in names or not weight.placements[names.index("tensor")].is_shard(0):
        return dropout
    rank, ranks = weight.device_mesh.get_local_rank("tensor"), weight.device_mesh.size(names.index("tensor"))

    def head_sharded(weights: torch.Tensor) -> torch.Tensor:
        return torch.cat([attention.attention_dropout(
            weights[b:b + 1], torch.stack([dropout_key[0], dropout_key[1], (dropout_key[2] + b) * ranks + rank]))
            for b in range(weights.shape[0])])

    return head_sharded


class Attention(nn.Module):
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

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype: torch.dtype = torch.float32,
                 param_dtype: torch.dtype | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.resolved_head_dim
        self.num_key_value_groups = config.num_key_value_groups
        self.scaling = config.query_scaling
        self.softcap = config.attn_logit_softcapping
        self.attn_implementation = "eager"
        e, h, k, d = config.hidden_size, config.num_attention_heads, config.resolved_num_key_value_heads, self.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        bias = config.attention_qkv_bias
        self.q_proj = linear(config, e, h * d, bias, **kw)
        self.k_proj = linear(config, e, k * d, bias, **kw)
        self.v_proj = linear(config, e, k * d, bias, **kw)
        self.o_proj = linear(config, h * d, e, config.attention_bias, **kw)
        self.attention_dropout = Dropout(config.attention_dropout, layer_idx, "attention")

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor, past_key_value: KVCache | None = None,
                dropout_key: torch.Tensor | None = None, is_causal: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, KVCache | None]:
        """hidden `[B, T, E]`, (cos, sin) `[B or 1, T, D]`, keep-mask `[B, 1, T, S]` ->
        (output `[B, T, E]`, weights `[B, H, T, S]`, cache). `is_causal`: the keep-mask is the
        plain causal one (the model's `mask_is_causal`), which the fast path then need not read."""
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # [B, H, T, D]
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # [B, K, T, D]
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_value is not None:
            past_key_value, key, value = past_key_value.update(key, value, self.layer_idx)
        # The fused kernels cannot cap scores or drop weights by this project's masks (dropout_key).
        fast = self.attn_implementation == "fast" and self.softcap is None and dropout_key is None
        if fast and query.dtype in (torch.float32, torch.bfloat16):
            out, weights = attention_fast(query, key, value, attention_mask, self.scaling, self.num_key_value_groups,
                                          is_causal)
        else:
            out, weights = attention_forward(query, key, value, attention_mask, self.scaling,
                                             self.num_key_value_groups, self.softcap,
                                             _attention_dropout(self, dropout_key))
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out), weights, past_key_value


def set_attn_implementation(model: nn.Module, name: str) -> nn.Module:
    """Switch every `Attention` of `model` to `name` ("eager" or "fast"); returns `model`."""
    if name not in ("eager", "fast"):
        raise ValueError(f"attn_implementation must be 'eager' or 'fast', got {name!r}")
    for module in model.modules():
        if isinstance(module, Attention):
            module.attn_implementation = name
    return model
