"""A third witness: the LLaMA forward pass in plain float64 numpy, written from the math
(the HF formulas), sharing no code with either twin. Twin parity proves the twins agree; this
proves they compute the right thing.
"""

from __future__ import annotations

import math

import numpy as np

from weights.config import ModelConfig


def inv_freq(cfg: ModelConfig, seq_len: int) -> np.ndarray:
    d = cfg.resolved_head_dim
    theta = cfg.rope_theta
    r = cfg.rope_scaling
    kind = r.rope_type if r is not None else "default"
    if kind == "dynamic" and seq_len > cfg.max_position_embeddings:
        # NTK-aware: the base grows with the length so the lowest frequency spans it.
        m = cfg.max_position_embeddings
        theta = theta * ((r.factor * seq_len / m) - (r.factor - 1)) ** (d / (d - 2))
    freqs = np.array([theta ** (-(2 * i) / d) for i in range(d // 2)])
    if kind == "linear":
        freqs = freqs / r.factor
    if kind == "llama3":
        out = []
        for f in freqs:
            wavelength = 2 * math.pi / f
            if wavelength < r.original_max_position_embeddings / r.high_freq_factor:
                out.append(f)
            elif wavelength > r.original_max_position_embeddings / r.low_freq_factor:
                out.append(f / r.factor)
            else:
                s = (r.original_max_position_embeddings / wavelength - r.low_freq_factor) / (
                    r.high_freq_factor - r.low_freq_factor)
                out.append((1 - s) * f / r.factor + s * f)
        freqs = np.array(out)
    return freqs


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def rotate(x: np.ndarray, pos: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """x [T, D] rotated pairwise: dims (i, i + D/2) by angle pos * freqs[i]."""
    ang = pos[:, None] * freqs[None, :]
    c, s = np.cos(ang), np.sin(ang)
    half = x.shape[-1] // 2
    a, b = x[:, :half], x[:, half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (max-shifted)."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis (max-shifted)."""
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def act(name: str, x: np.ndarray) -> np.ndarray:
    if name in ("silu", "swish"):
        return x / (1 + np.exp(-x))
    if name == "gelu":
        from scipy.special import erf
        return 0.5 * x * (1 + erf(x / math.sqrt(2)))
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return np.maximum(x, 0)
    raise ValueError(name)


def linear(w: dict, name: str, x: np.ndarray) -> np.ndarray:
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y


def decoder(cfg: ModelConfig, w: dict, ids: np.ndarray, mask: np.ndarray | None = None,
            pos: np.ndarray | None = None) -> np.ndarray:
    """Final normed hidden states [B, T, E], one row and one head at a time."""
    b, t = ids.shape
    mask = np.ones((b, t)) if mask is None else mask
    pos = np.broadcast_to(np.arange(t), (b, t)) if pos is None else pos
    h_q, h_kv, d = cfg.num_attention_heads, cfg.resolved_num_key_value_heads, cfg.resolved_head_dim
    out = np.zeros((b, t, cfg.hidden_size))
    freqs = inv_freq(cfg, int(pos.max()) + 1)  # dynamic rope: HF takes the batch-wide max position
    for row in range(b):
        x = w["model.embed_tokens.weight"][ids[row]].astype(np.float64)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
            q = linear(w, p + "self_attn.q_proj", h).reshape(t, h_q, d)
            k = linear(w, p + "self_attn.k_proj", h).reshape(t, h_kv, d)
            v = linear(w, p + "self_attn.v_proj", h).reshape(t, h_kv, d)
            heads = []
            for hq in range(h_q):
                hk = hq // (h_q // h_kv)  # query heads are grouped consecutively onto kv heads
                qh, kh = rotate(q[:, hq], pos[row], freqs), rotate(k[:, hk], pos[row], freqs)
                s = qh @ kh.T / math.sqrt(d)
                allowed = np.tril(np.ones((t, t), bool)) & (mask[row][None, :] > 0)
                s = np.where(allowed, s, -np.inf)
                # A query that sees no key (padding) gets uniform weights, as in both twins.
                s = np.where(allowed.any(-1, keepdims=True), s, 0.0)
                e = np.exp(s - s.max(-1, keepdims=True))
                heads.append((e / e.sum(-1, keepdims=True)) @ v[:, hk])
            x = x + linear(w, p + "self_attn.o_proj", np.concatenate(heads, axis=-1))
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            g = act(cfg.hidden_act, linear(w, p + "mlp.gate_proj", h))
            x = x + linear(w, p + "mlp.down_proj", g * linear(w, p + "mlp.up_proj", h))
        out[row] = rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
    return out


def causal_lm_logits(cfg: ModelConfig, w: dict, ids, mask=None, pos=None) -> np.ndarray:
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return decoder(cfg, w, ids, mask, pos) @ head.T


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = labels[row, t + 1]
            if y == -100:
                continue
            z = logits[row, t]
            total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[y]
            count += 1
    return total / max(count, 1)
