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
runs on its own tokens only; here as HF does (`index_add`, one expert at a time), in the Flax twin
as grouped products over tokens sorted by expert (`jax.lax.ragged_dot`, static shapes under jit).
Tests hold the sparse path to the dense one in each twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weights.config import ModelConfig

from .linear import linear
from .mlp import ACT2FN
from .precision import compute_dtype

DISPATCHES = ("dense", "sparse")


def top_k_lowest_index(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of `probs [..., X]` and their indices; equal values go to the lower index."""
    selected = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :k]
    return probs.gather(-1, selected), selected


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits `[N, X]` -> (routing weights `[N, k]` in the compute dtype, expert indices `[N, k]`)."""
    probs = torch.softmax(router_logits.to(compute_dtype(router_logits.dtype)), dim=-1)
    weights, selected = top_k_lowest_index(probs, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, selected


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """HF Mixtral's auxiliary loss: `num_experts * sum_x f_x * P_x`, where f is the fraction of
    (token, slot) assignments to expert x and P its mean router probability, over every layer's
    logits `[N, X]` and the real tokens of `attention_mask [B, T]` (all tokens when None).

    In the compute dtype (HF: the logits' dtype); with no real token it is 0, not NaN.
    """
    logits = torch.cat(router_logits, dim=0)
    logits = logits.to(compute_dtype(logits.dtype))
    probs = torch.softmax(logits, dim=-1)  # [L * N, X]
    _, selected = top_k_lowest_index(probs, top_k)
    expert_mask = F.one_hot(selected, num_experts).to(probs.dtype)  # [L * N, k, X]
    if attention_mask is None:
        keep = torch.ones(logits.shape[0], dtype=probs.dtype, device=probs.device)
    else:
        layers = logits.shape[0] // attention_mask.numel()
        keep = attention_mask.reshape(1, -1).expand(layers, -1).reshape(-1).to(probs.dtype)  # [L * N]
    count = keep.sum().clamp(min=1)
    tokens_per_expert = (expert_mask * keep[:, None, None]).sum(dim=0) / count  # [k, X]
    router_prob_per_expert = (probs * keep[:, None]).sum(dim=0) / count  # [X]
    return (tokens_per_expert * router_prob_per_expert[None]).sum() * num_experts


def current_token_mask(attention_mask: torch.Tensor | None, past_length: torch.Tensor | int, query_length: int
                       ) -> torch.Tensor | None:
    """The columns of a `[B, past + T]` (or `[B, S]`) padding mask that belong to the T new tokens
    (`past_length`: one int, or `[B]` when each row has its own cache position)."""
    if attention_mask is None or attention_mask.shape[-1] == query_length:
        return attention_mask
    index = torch.as_tensor(past_length, device=attention_mask.device).reshape(-1, 1) + torch.arange(
        query_length, device=attention_mask.device)
    return torch.gather(attention_mask, 1, index.expand(attention_mask.shape[0], query_length))


class ExpertMLP(nn.Module):
    """One expert: `w2(act(w1(x)) * w3(x))` (HF `MixtralBlockSparseTop2MLP`), no biases."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32,
                 param_dtype: torch.dtype | None = None):
        super().__init__()
        e, i = config.hidden_size, config.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.w1 = linear(config, e, i, False, **kw)
        self.w2 = linear(config, i, e, False, **kw)
        self.w3 = linear(config, e, i, False, **kw)
        self.act_fn = ACT2FN[config.mlp_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, E] -> [N, E]`."""
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class SparseMoeBlock(nn.Module):
    """Router `gate` (hidden -> num_local_experts, no bias) and the `experts`."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32,
                 param_dtype: torch.dtype | None = None, dispatch: str = "dense"):
        super().__init__()
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.dtype = dtype
        self.dispatch = dispatch
        self.gate = linear(config, config.hidden_size, self.num_experts, False, dtype=dtype, param_dtype=param_dtype)
        self.experts = nn.ModuleList([ExpertMLP(config, dtype=dtype, param_dtype=param_dtype)
                                      for _ in range(self.num_experts)])
        self.act_fn = ACT2FN[config.mlp_activation]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden `[B, T, E]` -> (output `[B, T, E]`, router logits `[N, X]`)."""
        b, t, e = hidden_states.shape
        x = hidden_states.reshape(-1, e)  # [N, E]
        router_logits = self.gate(x)  # [N, X]
        routing_weights, selected = route(router_logits, self.top_k, self.norm_topk_prob)
        routing_weights = routing_weights.to(x.dtype)
        if self.dispatch == "sparse":
            out = self.sparse_experts(x, routing_weights, selected)
        else:
            out = self.dense_experts(x, routing_weights, selected)
        return out.reshape(b, t, e), router_logits

    def dense_experts(self, x: torch.Tensor, routing_weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The reference: every expert on every token `x [N, E]`, weighted by `routing_weights
        [N, k]` for the experts `selected [N, k]` and by zero for the others -> `[N, E]`."""
        # [N, X]: each token's weight for every expert, zero for the experts it was not routed to
        # (a sum with one nonzero term: exact, no product rounds).
        dense_weights = (routing_weights[:, :, None] * F.one_hot(selected, self.num_experts).to(x.dtype)).sum(1)
        # The experts' weights stacked on a leading X axis, cast at use as `Linear` casts them.
        w1 = torch.stack([ex.w1.weight for ex in self.experts]).to(self.dtype)  # [X, I, E]
        w3 = torch.stack([ex.w3.weight for ex in self.experts]).to(self.dtype)  # [X, I, E]
        w2 = torch.stack([ex.w2.weight for ex in self.experts]).to(self.dtype)  # [X, E, I]
        h = self.act_fn(torch.einsum("ne,xie->xni", x, w1)) * torch.einsum("ne,xie->xni", x, w3)
        y = torch.einsum("xni,xei->xne", h, w2)  # every expert on every token
        # Weight then sum over experts, as HF does per expert (products rounded in the dtype).
        return (dense_weights.T[:, :, None] * y).sum(dim=0)

    def sparse_experts(self, x: torch.Tensor, routing_weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The fast path: each expert on the tokens routed to it only (HF's loop); same
        arguments and result as `dense_experts`."""
        out = torch.zeros_like(x)
        for expert_idx, expert in enumerate(self.experts):
            # An expert with no tokens still runs (on zero rows), so every expert gets a gradient.
            token_idx, slot = torch.where(selected == expert_idx)
            y = expert(x[token_idx]) * routing_weights[token_idx, slot, None]
            out = out.index_add(0, token_idx, y)
        return out


def set_moe_dispatch(model: nn.Module, dispatch: str) -> nn.Module:
    """Switch every `SparseMoeBlock` of `model` to `dispatch` ("dense" or "sparse"); returns it."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.dispatch = dispatch
    return model
