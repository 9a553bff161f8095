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

import math

import torch
import torch.nn.functional as F
from torch import nn

from weights.vq.config import TransformerVQConfig
from .common import MASK_INFTY_APPROX, at_least_float32, dropout_mask, linear, sg, to_dtype
from .norm import LayerNorm, layer_norm
from .position import get_sinusoid_embs
from .quantizer import LearnableVQ, VQSpec, one_hot

__all__ = ["rel_shift", "get_causal_mask", "get_agg_biases", "VQAttention"]


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Transformer-XL shift [.., L, W] -> [.., L, W]: pad one zero on the LEFT, view as
    [.., W+1, L], drop the first row, view back. Then out[i, j] = x[i, j + L - 1 - i]."""
    *lead, present_len, past_len = x.shape
    x = F.pad(x, (1, 0))
    x = x.reshape(*lead, past_len + 1, present_len)[..., 1:, :]
    return x.reshape(*lead, present_len, past_len)


def get_causal_mask(block_len: int, mem_len: int, invalid_len: torch.Tensor, with_locality: bool) -> torch.Tensor:
    """[L, W] bool: key j (frame position j, query i at M + i) is kept when it is allocated
    (j >= invalid_len), causal (j - M <= i) and, with locality, within distance M (j >= i)."""
    i = torch.arange(block_len)[:, None]
    j = torch.arange(mem_len + block_len)[None, :]
    keep = torch.logical_and(j >= invalid_len, j - mem_len <= i)
    if with_locality:
        keep = torch.logical_and(keep, j >= i)
    return keep


def get_agg_biases(lower: torch.Tensor) -> torch.Tensor:
    """log(count) per code, -1e30 for an empty code: exp(bias) = count."""
    return torch.where(lower == 0, torch.full_like(lower, -MASK_INFTY_APPROX),
                       torch.log(torch.clamp(lower, min=1.0)))


class VQAttention(nn.Module):
    """Gated attention with VQ keys: res = res_proj(attn(q, k_hat, v) * g), g = silu(gate)."""

    def __init__(self, config: TransformerVQConfig):
        super().__init__()
        c = self.config = config
        pdt = self.param_dtype = to_dtype(c.param_dtype)
        self.dtype = to_dtype(c.dtype)
        self.tau = c.d_k ** 0.5
        hk, hv = c.n_head * c.d_k, c.n_head * c.d_v
        self.input_ln = LayerNorm(c, c.d_model)

        def dense(fan_in: int, fan_out: int) -> nn.Linear:
            layer = nn.Linear(fan_in, fan_out, bias=False, dtype=pdt)
            nn.init.normal_(layer.weight, std=1.0 / math.sqrt(fan_in))  # untruncated, fan_in
            return layer

        self.q_proj = dense(c.d_model, hk)
        self.kvg_proj = dense(c.d_model, hk + 2 * hv)
        self.r_proj = dense(c.d_model, hk)
        self.res_proj = dense(hv, c.d_model)
        self.u = nn.Parameter(torch.zeros(hk, dtype=pdt))
        self.v = nn.Parameter(torch.zeros(hk, dtype=pdt))
        self.quantizer = LearnableVQ(c)

    @staticmethod
    def initial_state(config: TransformerVQConfig, batch_size: int) -> dict:
        """Empty caches: every xlcache code is C (invalid), counts and means zero."""
        c = config
        prefix = (batch_size, c.n_head)
        pdt, dt = to_dtype(c.param_dtype), to_dtype(c.dtype)
        return dict(
            pos_offset=torch.tensor(0, dtype=torch.int32),
            xlcache=dict(
                z=torch.full((*prefix, c.mem_len), c.n_code, dtype=torch.int32),
                k_hat=torch.zeros((*prefix, c.mem_len, c.d_k), dtype=pdt),
                v=torch.zeros((*prefix, c.mem_len, c.d_v), dtype=dt),
            ),
            aggcache=dict(
                upper_div_lower=torch.zeros((*prefix, c.n_code, c.d_v), dtype=dt),
                lower=torch.zeros((*prefix, c.n_code), dtype=dt),
            ),
        )

    def get_q(self, x_tilde: torch.Tensor) -> torch.Tensor:
        """[B,L,E] -> q [B,H,L,d_k] in param_dtype, RMS-normalised and scaled by d_k^-1/4."""
        c = self.config
        bsz, present_len, _ = x_tilde.shape
        q = linear(x_tilde, self.q_proj.weight, None, self.dtype)
        q = q.reshape(bsz, present_len, c.n_head, c.d_k)
        q = layer_norm(q, None, None) * (self.tau ** -0.5)
        return q.transpose(1, 2).to(self.param_dtype)

    def get_kvg(self, x_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B,L,E] -> k [B,H,L,d_k] (param_dtype), v [B,H,L,d_v], g [B,L,H*d_v] (dtype).
        The fused projection is cut k | v | g, head-major inside each chunk, as the reference's fused kernel is laid out."""
        c = self.config
        bsz, present_len, _ = x_tilde.shape
        kvg = linear(x_tilde, self.kvg_proj.weight, None, self.dtype)
        k, v, g = torch.split(kvg, [c.n_head * c.d_k, c.n_head * c.d_v, c.n_head * c.d_v], dim=-1)
        k = k.reshape(bsz, present_len, c.n_head, c.d_k)
        v = v.reshape(bsz, present_len, c.n_head, c.d_v)
        k = layer_norm(k, None, None) * (self.tau ** -0.5)
        v = F.silu(v)
        g = F.silu(g)
        return k.transpose(1, 2).to(self.param_dtype), v.transpose(1, 2), g

    def get_xl_helpers(self, block_len: int, dropsin: torch.Tensor | None):
        """Relative features xl_r [H,W,d_k] (row w = distance W-1-w) and u', v' [1,H,1,d_k],
        each scaled by d_k^-1/4 (so q.k carries 1/sqrt(d_k), split evenly between the sides)."""
        c = self.config
        w = c.mem_len + block_len
        xl_r = get_sinusoid_embs(w, c.d_model, c.pe_lam, flip=True, dtype=at_least_float32(self.dtype))
        if dropsin is not None:
            xl_r = xl_r * dropsin
        xl_r = linear(xl_r, self.r_proj.weight, None, self.dtype)
        xl_r = xl_r.reshape(w, c.n_head, c.d_k).transpose(0, 1)
        xl_r = xl_r.to(self.param_dtype) * (self.tau ** -0.5)
        xl_u = self.u.reshape(1, c.n_head, 1, c.d_k) * (self.tau ** -0.5)
        xl_v = self.v.reshape(1, c.n_head, 1, c.d_k) * (self.tau ** -0.5)
        return xl_r, xl_u, xl_v

    def attn(self, q, k, v, state: dict, vq_spec: VQSpec | None, is_train: bool,
             dropsin: torch.Tensor | None = None) -> dict:
        """Softmax attention over the recent window (xlcache + block) and the C aggcache codes."""
        c = self.config
        bsz, _, block_len, _ = q.shape
        vq = self.quantizer(k, vq_spec, is_train)
        xlcache, aggcache = state["xlcache"], state["aggcache"]
        recent_z = torch.cat([xlcache["z"], vq["shortcodes"]], dim=-1)
        recent_k_hat = torch.cat([xlcache["k_hat"], vq["quantized"]], dim=-2)
        recent_v = torch.cat([xlcache["v"], v], dim=-2)
        xl_r, xl_u, xl_v = self.get_xl_helpers(block_len, dropsin)

        # Scores against the compressed cache: codewords plus log-count biases.
        cb = self.quantizer.get_codebook()
        cache_scores = torch.einsum("bhlk,hsk->bhls", q + xl_u, cb)
        cache_scores = cache_scores + get_agg_biases(aggcache["lower"])[..., None, :]

        # Scores against the recent window; the relative bias only within distance <= M.
        invalid_len = torch.relu(c.mem_len - state["pos_offset"])  # a tensor: .item() would break compile
        ac = torch.einsum("bhlk,bhwk->bhlw", q + xl_u, recent_k_hat)
        bd = rel_shift(torch.einsum("bhlk,hwk->bhlw", q + xl_v, xl_r))
        bd = bd * get_causal_mask(block_len, c.mem_len, invalid_len, True)[None, None].to(bd.dtype)
        recent_scores = ac + bd
        keep = get_causal_mask(block_len, c.mem_len, invalid_len, not c.agg_cache)[None, None]
        keep = keep.to(recent_scores.dtype)
        recent_scores = recent_scores * keep - MASK_INFTY_APPROX * (1 - keep)

        # One joint max over both score sets, stop-gradient'ed, even without the aggcache, as the reference does.
        max_scores = sg(torch.maximum(torch.amax(cache_scores, dim=-1), torch.amax(recent_scores, dim=-1)))
        cache_a = torch.exp(cache_scores - max_scores[..., None]).to(self.dtype)
        recent_a = torch.exp(recent_scores - max_scores[..., None]).to(self.dtype)

        # Normalise the weights before the value product: a.v is never formed unnormalised.
        d = torch.sum(recent_a, dim=-1)
        if c.agg_cache:
            d = d + torch.sum(cache_a, dim=-1)
        wv = torch.einsum("bhlw,bhwv->bhlv", recent_a / d[..., None], recent_v)
        if c.agg_cache:
            wv = wv + torch.einsum("bhls,bhsv->bhlv", cache_a / d[..., None], aggcache["upper_div_lower"])
        wv = wv.transpose(1, 2).reshape(bsz, block_len, c.n_head * c.d_v)
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
        new_lower = aggcache["lower"] + torch.sum(delta, dim=-2)
        f1 = aggcache["lower"] / torch.clamp(new_lower, min=1.0)
        f2 = delta / torch.clamp(new_lower, min=1.0)[..., None, :]
        new_upper_div_lower = (f1[..., None] * aggcache["upper_div_lower"]
                               + torch.einsum("bhls,bhlv->bhsv", f2, recent_v[..., :-m, :]))
        new_state = dict(
            pos_offset=state["pos_offset"] + block_len,
            xlcache=dict(z=recent_z[..., -m:], k_hat=recent_k_hat[..., -m:, :], v=recent_v[..., -m:, :]),
            aggcache=dict(upper_div_lower=new_upper_div_lower, lower=new_lower),
        )
        if not c.grad_thru_cache:
            new_state = tree_detach(new_state)
        return new_state

    def forward(self, state: dict, x: torch.Tensor, vq_spec: VQSpec | None = None, *,
                is_train: bool = False, dropsin: torch.Tensor | None = None,
                rng: torch.Generator | None = None) -> tuple[dict, dict]:
        """One block x [B,L,E] -> (new_state, {res, l_commit, l_codebook, metrics}).
        `dropsin` is the [W, E] sinusoid dropout mask shared by all blocks of a call."""
        x_tilde = self.input_ln(x)
        q = self.get_q(x_tilde)
        k, v, g = self.get_kvg(x_tilde)
        out = self.attn(q, k, v, state, vq_spec, is_train, dropsin)
        res = linear(out["attn_out"] * g, self.res_proj.weight, None, self.dtype)
        if is_train:
            mask = dropout_mask(tuple(res.shape), self.config.p_dropres, res.dtype, rng)
            res = res if mask is None else res * mask
        new_state = self.update_state(out["recent_z"], out["recent_k_hat"], out["recent_v"], state)
        return new_state, dict(res=res, l_commit=out["l_commit"], l_codebook=out["l_codebook"],
                               metrics=out["metrics"])


def tree_detach(tree):
    """Stop-gradient on every tensor of a nested dict / list state."""
    if isinstance(tree, dict):
        return {k: tree_detach(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_detach(v) for v in tree)
    return tree.detach()
