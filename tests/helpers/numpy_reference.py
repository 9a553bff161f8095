"""A third witness: the LLaMA-family forward pass, the three heads and their losses in plain
float64 numpy, written from the Hugging Face modeling files (llama, mistral, mixtral, qwen2,
gemma, gemma2) and sharing no code with either twin.

Twin parity proves the twins agree; this proves they compute the right thing, so a mistake
made identically in both twins, or in the numpy code they share (`weights/`), cannot pass.
It reads only raw config fields: what HF hard-codes per family (Gemma's `1 + w` norm and
sqrt(E) embeddings, Qwen2's q/k/v-only bias, Gemma 2's sandwich norms and alternating windows)
is derived here from `model_type`, not from the switches `weights/` derives, so a wrong entry
in `weights/families.py` or a wrong derived property of `ModelConfig` is caught too. It is
slow (one row, one head, one expert at a time) and meant for tiny configs.

Where twinlm defines what HF leaves undefined, the witness follows twinlm and says so: a query
that sees no key (a padding query) gets uniform weights (HF: NaN or garbage), and a loss over
zero counted items is 0 (HF: NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from weights.config import ModelConfig

GEMMA = ("gemma", "gemma2")
IGNORE = -100


# ---- what HF does for a config, from its raw fields ------------------------------------------

@dataclass(frozen=True)
class Switches:
    """The behaviour HF's modeling file gives a config (derived independently of `weights/`)."""

    head_dim: int
    kv_heads: int
    activation: str  # ACT2FN name of the MLP gate
    norm_offset: bool  # RMSNorm scales by (1 + w): Gemma
    embed_scale: bool  # embeddings times sqrt(E): Gemma, Grok-1
    sandwich: bool  # a norm after attention and after the MLP: Gemma 2, Grok-1
    windows: tuple[int | None, ...]  # per layer: the key window in cache slots, None = global
    q_scale: float  # multiplier of q.k
    attn_cap: float | None
    final_cap: float | None
    qkv_bias: bool
    o_bias: bool
    experts: int  # 0 = dense MLP
    top_k: int
    renormalize: bool  # Mixtral renormalises the top-k probabilities; Grok-1 does not


def switches(cfg: ModelConfig) -> Switches:
    mt = cfg.model_type
    d = cfg.head_dim if cfg.head_dim is not None else cfg.hidden_size // cfg.num_attention_heads
    # GemmaMLP applies ACT2FN[hidden_activation]; with it unset, HF fell back to the tanh GELU
    # (ignoring hidden_act). Every other family's MLP applies hidden_act.
    activation = (cfg.hidden_activation or "gelu_pytorch_tanh") if mt in GEMMA else cfg.hidden_act
    n = cfg.num_hidden_layers
    if cfg.layer_types is not None:
        kinds = tuple(cfg.layer_types)
    elif mt in ("mistral", "mixtral"):  # MistralAttention: every layer slides when a window is set
        kinds = ("sliding_attention" if cfg.sliding_window is not None else "full_attention",) * n
    elif mt == "qwen2":  # Qwen2Config: layers from max_window_layers on slide, when enabled
        kinds = tuple("sliding_attention" if cfg.use_sliding_window and cfg.sliding_window is not None
                      and i >= cfg.max_window_layers else "full_attention" for i in range(n))
    elif mt == "gemma2":  # Gemma2Config: layer_types[i] = sliding if (i + 1) % 2 else full
        kinds = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n))
    else:
        kinds = ("full_attention",) * n
    windows = tuple(cfg.sliding_window if k == "sliding_attention" else None for k in kinds)
    scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else d  # Gemma2: scalar ** -0.5
    return Switches(
        head_dim=d, kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads, activation=activation,
        norm_offset=mt in GEMMA or cfg.norm_unit_offset, embed_scale=mt in GEMMA or cfg.scale_embeddings,
        sandwich=mt == "gemma2" or cfg.sandwich_norm, windows=windows, q_scale=scalar ** -0.5,
        attn_cap=cfg.attn_logit_softcapping, final_cap=cfg.final_logit_softcapping,
        # Qwen2Attention: q/k/v always biased, o never; LlamaAttention: attention_bias on all four.
        qkv_bias=cfg.attention_bias or mt == "qwen2" or cfg.qkv_bias, o_bias=cfg.attention_bias,
        experts=cfg.num_local_experts or 0, top_k=cfg.num_experts_per_tok, renormalize=cfg.norm_topk_prob)


def expected_names(cfg: ModelConfig, head: str) -> set[str]:
    """The HF tensor names of a checkpoint of `cfg` with `head` (`causal_lm`,
    `sequence_classification`, `question_answering`), spelled from the HF modeling files."""
    s = switches(cfg)
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj, bias in (("q_proj", s.qkv_bias), ("k_proj", s.qkv_bias), ("v_proj", s.qkv_bias), ("o_proj", s.o_bias)):
            names |= {p + f"self_attn.{proj}.weight"} | ({p + f"self_attn.{proj}.bias"} if bias else set())
        norms = ["input_layernorm", "post_attention_layernorm"]
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if s.sandwich else []
        names |= {p + f"{n}.weight" for n in norms}
        if s.experts:
            names.add(p + "block_sparse_moe.gate.weight")
            names |= {p + f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(s.experts) for w in ("w1", "w2", "w3")}
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names |= {p + f"mlp.{proj}.weight"} | ({p + f"mlp.{proj}.bias"} if cfg.mlp_bias else set())
    if head == "causal_lm" and not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    if head == "sequence_classification":
        names.add("score.weight")
    if head == "question_answering":
        names |= {"qa_outputs.weight", "qa_outputs.bias"}
    return names


# ---- the pieces ------------------------------------------------------------------------------

def inv_freq(cfg: ModelConfig, seq_len: int) -> np.ndarray:
    """Rotary inverse frequencies [D/2], from the definitions (HF `modeling_rope_utils`, Meta's
    `apply_scaling`), one frequency at a time. `seq_len` matters for dynamic NTK only."""
    d = cfg.head_dim if cfg.head_dim is not None else cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_theta
    r = cfg.rope_scaling
    kind = r.rope_type if r is not None else "default"
    if kind == "dynamic" and seq_len > cfg.max_position_embeddings:
        # NTK-aware: the base grows with the length so the lowest frequency still spans it.
        m = cfg.max_position_embeddings
        theta = theta * ((r.factor * seq_len / m) - (r.factor - 1)) ** (d / (d - 2))
    freqs = [theta ** (-(2 * i) / d) for i in range(d // 2)]
    if kind == "linear":
        freqs = [f / r.factor for f in freqs]
    if kind == "llama3":
        out = []
        for f in freqs:
            wavelength = 2 * math.pi / f
            if wavelength < r.original_max_position_embeddings / r.high_freq_factor:
                out.append(f)  # short wavelengths: kept
            elif wavelength > r.original_max_position_embeddings / r.low_freq_factor:
                out.append(f / r.factor)  # long wavelengths: slowed by the factor
            else:  # in between: interpolated
                s = (r.original_max_position_embeddings / wavelength - r.low_freq_factor) / (
                    r.high_freq_factor - r.low_freq_factor)
                out.append((1 - s) * f / r.factor + s * f)
        freqs = out
    return np.array(freqs)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, offset: bool = False) -> np.ndarray:
    return (1.0 + w if offset else w) * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def rotate(x: np.ndarray, pos: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """x [T, D] rotated pairwise: dims (i, i + D/2) by angle pos * freqs[i]."""
    ang = pos[:, None] * freqs[None, :]
    c, s = np.cos(ang), np.sin(ang)
    half = x.shape[-1] // 2
    a, b = x[:, :half], x[:, half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def act(name: str, x: np.ndarray) -> np.ndarray:
    if name in ("silu", "swish"):
        return x / (1 + np.exp(-x))
    if name == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * x * (1 + erf(x / math.sqrt(2)))
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return np.maximum(x, 0)
    raise ValueError(name)


def linear(w: dict, name: str, x: np.ndarray) -> np.ndarray:
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y


def cap(x: np.ndarray, c: float | None) -> np.ndarray:
    return x if c is None else c * np.tanh(x / c)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (max-shifted)."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis (max-shifted)."""
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def moe(s: Switches, cfg: ModelConfig, w: dict, p: str, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF MixtralSparseMoeBlock, token by token: (output [T, E], router logits [T, X])."""
    logits = h @ w[p + "gate.weight"].T
    out = np.zeros_like(h)
    for t in range(h.shape[0]):
        probs = softmax(logits[t])
        chosen = sorted(range(s.experts), key=lambda e: (-probs[e], e))[:s.top_k]  # ties: lower index
        weights = np.array([probs[e] for e in chosen])
        if s.renormalize:
            weights = weights / weights.sum()
        for e, g in zip(chosen, weights):
            x = h[t]
            q = f"{p}experts.{e}."
            y = (act(s.activation, x @ w[q + "w1.weight"].T) * (x @ w[q + "w3.weight"].T)) @ w[q + "w2.weight"].T
            out[t] += g * y
    return out, logits


# ---- the decoder -----------------------------------------------------------------------------

def decoder(cfg: ModelConfig, w: dict, ids: np.ndarray, mask: np.ndarray | None = None,
            pos: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(final normed hidden states [B, T, E], router logits per layer [B * T, X] (empty list
    without experts)), one row, one head and one token's experts at a time."""
    s = switches(cfg)
    b, t = ids.shape
    mask = np.ones((b, t)) if mask is None else mask
    pos = np.broadcast_to(np.arange(t), (b, t)) if pos is None else pos
    h_q, h_kv, d, eps = cfg.num_attention_heads, s.kv_heads, s.head_dim, cfg.rms_norm_eps
    out = np.zeros((b, t, cfg.hidden_size))
    router = [np.zeros((b, t, s.experts)) for _ in range(cfg.num_hidden_layers)] if s.experts else []
    freqs = inv_freq(cfg, int(pos.max()) + 1)  # dynamic rope: HF takes the batch-wide max position
    for row in range(b):
        x = w["model.embed_tokens.weight"][ids[row]].astype(np.float64)
        if s.embed_scale:
            x = x * math.sqrt(cfg.hidden_size)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps, s.norm_offset)
            q = linear(w, p + "self_attn.q_proj", h).reshape(t, h_q, d)
            k = linear(w, p + "self_attn.k_proj", h).reshape(t, h_kv, d)
            v = linear(w, p + "self_attn.v_proj", h).reshape(t, h_kv, d)
            query_index, key_index = np.arange(t)[:, None], np.arange(t)[None, :]
            allowed = (key_index <= query_index) & (mask[row][None, :] > 0)
            if s.windows[i] is not None:  # the last `window` slots, the query's own included
                allowed &= query_index - key_index < s.windows[i]
            heads = []
            for hq in range(h_q):
                hk = hq // (h_q // h_kv)  # query heads are grouped consecutively onto kv heads
                qh, kh = rotate(q[:, hq], pos[row], freqs), rotate(k[:, hk], pos[row], freqs)
                scores = cap(qh @ kh.T * s.q_scale, s.attn_cap)  # Gemma 2: capped before the mask
                scores = np.where(allowed, scores, -np.inf)
                # A query that sees no key (padding) gets uniform weights, as twinlm defines.
                scores = np.where(allowed.any(-1, keepdims=True), scores, 0.0)
                heads.append(softmax(scores) @ v[:, hk])
            a = linear(w, p + "self_attn.o_proj", np.concatenate(heads, axis=-1))
            if s.sandwich:
                a = rms_norm(a, w[p + "post_attention_layernorm.weight"], eps, s.norm_offset)
            x = x + a
            pre = "pre_feedforward_layernorm" if s.sandwich else "post_attention_layernorm"
            h = rms_norm(x, w[p + pre + ".weight"], eps, s.norm_offset)
            if s.experts:
                m, router[i][row] = moe(s, cfg, w, p + "block_sparse_moe.", h)
            else:
                g = act(s.activation, linear(w, p + "mlp.gate_proj", h))
                m = linear(w, p + "mlp.down_proj", g * linear(w, p + "mlp.up_proj", h))
            if s.sandwich:
                m = rms_norm(m, w[p + "post_feedforward_layernorm.weight"], eps, s.norm_offset)
            x = x + m
        out[row] = rms_norm(x, w["model.norm.weight"], eps, s.norm_offset)
    return out, [r.reshape(b * t, -1) for r in router]


# ---- losses ----------------------------------------------------------------------------------

def nll(z: np.ndarray, y: int) -> float:
    """-log softmax(z)[y]."""
    return float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[y])


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Position t predicts label t + 1; -100 is ignored; mean over counted items (0 if none)."""
    terms = [nll(logits[row, t], labels[row, t + 1]) for row in range(labels.shape[0])
             for t in range(labels.shape[1] - 1) if labels[row, t + 1] != IGNORE]
    return sum(terms) / max(len(terms), 1)


def load_balancing_loss(router: list[np.ndarray], num_experts: int, top_k: int, mask: np.ndarray) -> float:
    """HF `load_balancing_loss_func`: num_experts * sum_x f_x P_x over all layers' real tokens,
    f_x = share of (token, slot) choices that went to expert x, P_x = its mean probability."""
    keep = np.concatenate([mask.reshape(-1)] * len(router)).astype(bool)
    probs = [softmax(z) for z in np.concatenate(router)[keep]]
    n = max(len(probs), 1)
    f, p = np.zeros((top_k, num_experts)), np.zeros(num_experts)
    for pr in probs:
        chosen = sorted(range(num_experts), key=lambda e: (-pr[e], e))[:top_k]
        for slot, e in enumerate(chosen):
            f[slot, e] += 1 / n
        p += pr / n
    return float((f * p[None]).sum() * num_experts)


def classification_loss(pooled: np.ndarray, labels: np.ndarray, cfg: ModelConfig) -> float:
    """HF's sequence-classification loss: MSE, cross-entropy or BCE-with-logits, by problem type
    (inferred when unset: one label is regression, integer labels single-label, else multi-label)."""
    kind = cfg.problem_type or ("regression" if cfg.num_labels == 1 else
                                "single_label_classification" if labels.dtype.kind in "iu" else
                                "multi_label_classification")
    if kind == "regression":
        return float(((pooled.reshape(-1) - labels.reshape(-1)) ** 2).mean())
    if kind == "single_label_classification":
        terms = [nll(pooled[r], int(y)) for r, y in enumerate(labels.reshape(-1)) if y != IGNORE]
        return sum(terms) / max(len(terms), 1)
    # -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))], averaged over every element;
    # -log sigmoid(x) = log(1 + e^-x) and -log(1 - sigmoid(x)) = log(1 + e^x).
    return float((labels * np.logaddexp(0, -pooled) + (1 - labels) * np.logaddexp(0, pooled)).mean())


def span_loss(start: np.ndarray, end: np.ndarray, start_pos: np.ndarray, end_pos: np.ndarray) -> float:
    """HF's QA loss: positions clamped to [0, T], T ignored; mean of the start and end
    cross-entropies, each over its counted rows (0 if none)."""
    t = start.shape[1]

    def ce(logits: np.ndarray, positions: np.ndarray) -> float:
        terms = [nll(z, int(p)) for z, p in zip(logits, np.clip(positions, 0, t)) if p != t]
        return sum(terms) / max(len(terms), 1)

    return (ce(start, start_pos) + ce(end, end_pos)) / 2


# ---- the heads -------------------------------------------------------------------------------

def last_token(ids: np.ndarray, pad_token_id: int | None) -> np.ndarray:
    """HF's pooling index per row: the rightmost token that is not the pad id (0 when every
    token is the pad id); without a pad id, the last position."""
    if pad_token_id is None:
        return np.full(ids.shape[0], ids.shape[1] - 1)
    return np.array([max([j for j in range(len(r)) if r[j] != pad_token_id], default=0) for r in ids])


def forward(cfg: ModelConfig, head: str, w: dict, ids: np.ndarray, mask: np.ndarray | None = None,
            pos: np.ndarray | None = None, **labels: np.ndarray) -> dict[str, np.ndarray | float]:
    """One head's outputs (`logits`, or `start_logits` / `end_logits`), and its `loss` when the
    labels are given (causal LM: `labels`; classification: `labels`; QA: `start_positions`,
    `end_positions`); with experts and `output_router_logits`, `aux_loss` and `router_logits`."""
    hidden, router = decoder(cfg, w, ids, mask, pos)
    out: dict[str, np.ndarray | float] = {}
    if head == "causal_lm":
        lm = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
        out["logits"] = cap(hidden @ lm.T, cfg.final_logit_softcapping)
        if "labels" in labels:
            out["loss"] = causal_lm_loss(out["logits"], labels["labels"])
        if router and cfg.output_router_logits:
            m = np.ones(ids.shape) if mask is None else mask
            out["aux_loss"] = load_balancing_loss(router, cfg.num_local_experts, cfg.num_experts_per_tok, m)
            out["router_logits"] = router
            if "loss" in out:
                out["loss"] += cfg.router_aux_loss_coef * out["aux_loss"]
    elif head == "sequence_classification":
        logits = hidden @ w["score.weight"].T
        out["logits"] = logits[np.arange(ids.shape[0]), last_token(ids, cfg.pad_token_id)]
        if "labels" in labels:
            out["loss"] = classification_loss(out["logits"], labels["labels"], cfg)
    elif head == "question_answering":
        logits = linear(w, "qa_outputs", hidden)  # [B, T, 2]: start, then end (HF's split)
        out["start_logits"], out["end_logits"] = logits[..., 0], logits[..., 1]
        if "start_positions" in labels:
            out["loss"] = span_loss(out["start_logits"], out["end_logits"], labels["start_positions"],
                                    labels["end_positions"])
    else:
        raise KeyError(head)
    return out


def causal_lm_logits(cfg: ModelConfig, w: dict, ids, mask=None, pos=None) -> np.ndarray:
    """The causal-LM logits [B, T, V] (kept for the callers of the first version)."""
    return forward(cfg, "causal_lm", w, ids, mask, pos)["logits"]


def counted_positions(mask: np.ndarray) -> np.ndarray:
    """Position ids from a padding mask, written row by row: each real token's position is the
    number of real tokens before it; a pad before them gets 0, a pad after them the last position
    (HF's generate puts 1 on pads: any value works, padded slots are masked)."""
    out = np.zeros(mask.shape, np.int64)
    for r, row in enumerate(mask):
        seen = 0
        for j, m in enumerate(row):
            out[r, j] = seen if m else max(seen - 1, 0)
            seen += int(m)
    return out
