"""Transformer-VQ from the math, in plain numpy: the third witness for both twins.

Written from the dense-equivalent formula of the spec (§3.7), not from either twin: every key
is replaced by its codeword, and for query t and key s <= t with distance d = t - s

    score(t, s) = (q_t + u') . c_{z_s}  +  [d <= M] (q_t + v') . r'_d,
    A(t) = {0..t} with the aggregated cache, {max(0, t-M)..t} without it,
    o_t = sum_{s in A(t)} softmax_s(score(t, s)) v_s.

There are no blocks, no caches, no masks and no max-shift here: if the twins' blockwise
recurrence equals this for every block length, the caches and masks are right. Parameters are
the torch-named numpy tensors of `weights.vq.checkpoint`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from weights.vq.config import TransformerVQConfig

__all__ = ["rms_norm", "sinusoids", "quantize", "dense_sublayer", "dense_forward"]


def rms_norm(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """x / sqrt(eps + mean(x^2)) over the last axis."""
    return x / np.sqrt(eps + np.mean(x * x, axis=-1, keepdims=True))


def sinusoids(positions: np.ndarray, width: int, lam: float) -> np.ndarray:
    """[n, width]: sin(p w_i) for i < width/2, then cos(p w_i); w_i = lam^(-2i/width)."""
    omega = lam ** (-np.arange(width // 2) * 2.0 / width)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def quantize(k: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """k [B,H,T,d], codebook [H,C,d] -> (codes [B,H,T], squared distance to the codeword)."""
    dist2 = np.sum((k[:, :, :, None, :] - codebook[None, :, None, :, :]) ** 2, axis=-1)
    z = np.argmin(dist2, axis=-1)
    return z, np.min(dist2, axis=-1)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def dense_sublayer(p: Mapping[str, np.ndarray], prefix: str, x: np.ndarray, c: TransformerVQConfig,
                   loss_mask: np.ndarray) -> tuple[np.ndarray, float]:
    """One VQ-GAU over the whole sequence x [B,T,E] -> (residual branch [B,T,E], l_commit)."""
    b, t, _ = x.shape
    h, dk, dv, m = c.n_head, c.d_k, c.d_v, c.mem_len
    scale = dk ** -0.25
    xt = rms_norm(x) * p[prefix + "input_ln.g"] + p[prefix + "input_ln.b"]
    q = rms_norm((xt @ p[prefix + "q_proj.weight"].T).reshape(b, t, h, dk)) * scale
    kvg = xt @ p[prefix + "kvg_proj.weight"].T
    k = rms_norm(kvg[..., :h * dk].reshape(b, t, h, dk)) * scale
    v = _silu(kvg[..., h * dk:h * (dk + dv)].reshape(b, t, h, dv))
    g = _silu(kvg[..., h * (dk + dv):])
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B,H,T,.]
    codebook = p[prefix + "quantizer.c_sum"] / np.maximum(p[prefix + "quantizer.c_count"], 0.01)[..., None]
    z, err2 = quantize(k, codebook)
    k_hat = np.take_along_axis(codebook[None], z[..., None], axis=2)  # [B,H,T,dk]
    l_commit = float(np.mean(np.sum(loss_mask[:, None, :] * err2, axis=1)))
    r = sinusoids(np.arange(m + 1), c.d_model, c.pe_lam) @ p[prefix + "r_proj.weight"].T  # [M+1, H*dk]
    r = r.reshape(m + 1, h, dk).transpose(1, 0, 2) * scale  # r[h, distance]
    u = p[prefix + "u"].reshape(1, h, 1, dk) * scale
    vb = p[prefix + "v"].reshape(1, h, 1, dk) * scale
    content = np.einsum("bhtk,bhsk->bhts", q + u, k_hat)
    pos_all = np.einsum("bhtk,hdk->bhtd", q + vb, r)  # [B,H,T,M+1] by distance
    dist = np.arange(t)[:, None] - np.arange(t)[None, :]
    position = np.zeros_like(content)
    near = (dist >= 0) & (dist <= m)
    ti, si = np.nonzero(near)
    position[:, :, ti, si] = pos_all[:, :, ti, dist[ti, si]]
    allowed = (dist >= 0) if c.agg_cache else near
    scores = np.where(allowed, content + position, -np.inf)
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
    w = w / w.sum(axis=-1, keepdims=True)
    o = np.einsum("bhts,bhsv->bhtv", w, v).transpose(0, 2, 1, 3).reshape(b, t, h * dv)
    return (o * g) @ p[prefix + "res_proj.weight"].T, l_commit


def dense_forward(p: Mapping[str, np.ndarray], c: TransformerVQConfig, inputs: np.ndarray,
                  loss_mask: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Whole model from the first token: inputs [B,T] ids ([B,T,E] when no_emb) ->
    (log-probabilities [B,T,V], l_commit summed over sublayers)."""
    x = np.asarray(inputs, np.float64) if c.no_emb else p["token_embedder.embs"][inputs]
    b, t = x.shape[:2]
    loss_mask = np.ones((b, t)) if loss_mask is None else loss_mask
    if c.pe_abs:
        x = x + p["position_embedder.scale"] * sinusoids(np.arange(t), c.d_model, c.pe_lam)[None]
    l_commit = 0.0
    for i in range(c.n_layer):
        for j in (1, 2):
            res, lc = dense_sublayer(p, f"transformer_layers.{i}.scanned_attn{j}.", x, c, loss_mask)
            x = x + res
            l_commit += lc
    if c.e_preln:
        x = rms_norm(x) * p["out_ln.g"] + p["out_ln.b"]
    if c.e_tie:
        logits = x @ p["token_embedder.embs"].T + p["token_embedder.bias_out"]
    else:
        logits = x @ p["out_proj.weight"].T + p["out_proj.bias"]
    logits = logits * c.e_scale
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True)), l_commit
