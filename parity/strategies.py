"""Hypothesis strategies for twinlm: configs, input batches and dtypes, as a public API.

A user's own CI can draw from these to test a model change:

    from hypothesis import given
    from parity import strategies as tst

    @given(tst.configs(), tst.data())
    def test_mine(config, data): batch = data.draw(tst.batches(config)); ...

Configs stay tiny (a forward pass in milliseconds) but cover every switch: MHA/GQA/MQA, head
dims decoupled from the width, every rope scaling, biases, tied embeddings, activations, and
position ids far from 0 (rotary bugs hide at short positions). They are drawn from every model
family (`weights.families.FAMILIES`) with that family's switches — sliding windows shorter than
the batches, Gemma's norms and embedding scale, soft-capping, sandwich norms, experts — and
sometimes mixed across families (Grok-1: experts, sandwich norms and capped scores on one
model). `family_examples()` gives one fixed tiny config per family.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.strategies import data  # re-exported for `@given(..., tst.data())`

from weights.config import ACTIVATIONS, ModelConfig, RopeScaling
from weights.families import FAMILIES

from .inputs import HEADS, Batch, head_labels

__all__ = ["Batch", "batches", "cases", "configs", "data", "dtypes", "family_examples",
           "family_switches", "heads", "rope_scalings"]


@st.composite
def rope_scalings(draw, max_position_embeddings: int, head_dim: int = 8) -> RopeScaling | None:
    """None or one of the rotary scalings with valid parameters (dynamic needs head_dim > 2)."""
    kinds = ["none", "default", "linear", "llama3"] + (["dynamic"] if head_dim > 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    if kind == "default":
        return RopeScaling("default")
    factor = draw(st.sampled_from([1.0, 2.0, 4.0, 8.0]))
    if kind in ("linear", "dynamic"):
        return RopeScaling(kind, factor=factor)
    low = draw(st.sampled_from([0.5, 1.0, 2.0]))
    high = low * draw(st.sampled_from([2.0, 4.0]))
    orig = draw(st.sampled_from([max(4, max_position_embeddings // 4), max_position_embeddings]))
    return RopeScaling("llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                       original_max_position_embeddings=orig)


@st.composite
def configs(draw, max_layers: int = 2, families: bool = True, sparse_routing: bool = False) -> ModelConfig:
    """A tiny valid `ModelConfig` drawn across every switch the twins support.

    With `families` (the default) the config belongs to a drawn family (`model_type`) with
    that family's switches (`family_switches`); without, it is a LLaMA config.

    Mixture-of-experts configs route every token to all experts unless `sparse_routing`: a
    top-k choice between two experts whose router logits differ by less than the rounding
    error is a discrete flip, which half-precision parity cannot tolerate. Pass
    `sparse_routing=True` for float64/float32 checks (a flip there needs an exact tie).
    """
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    decoupled = draw(st.booleans())  # head_dim independent of hidden_size / heads
    hidden = draw(st.sampled_from([8, 16, 24])) if decoupled else heads * head_dim
    max_pos = draw(st.sampled_from([32, 256, 2048, 4096]))
    vocab = draw(st.integers(8, 64))
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=draw(st.sampled_from([8, 20, 32])),
        num_hidden_layers=draw(st.integers(1, max_layers)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim if decoupled else draw(st.sampled_from([None, head_dim])),
        hidden_act=draw(st.sampled_from(ACTIVATIONS)),
        max_position_embeddings=max_pos,
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
        rope_scaling=draw(rope_scalings(max_pos, head_dim)),
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        initializer_range=draw(st.sampled_from([0.02, 0.2])),
        pad_token_id=draw(st.one_of(st.none(), st.integers(0, vocab - 1))),
        num_labels=draw(st.integers(1, 4)),
    )
    if not families:
        return ModelConfig(**fields)
    model_type = draw(st.sampled_from(tuple(FAMILIES)))
    switches = draw(family_switches(model_type, fields["num_hidden_layers"], sparse_routing))
    return ModelConfig.for_family(model_type, **fields, **switches)


@st.composite
def family_switches(draw, model_type: str, num_layers: int, sparse_routing: bool = False) -> dict:
    """Switch values for a config of family `model_type` (field -> value), drawn around the
    family's own: windows of 1-6 slots (shorter than the batches), caps small enough to bite,
    and, in any family now and then, Grok-1's experts + sandwich norms + capped scores."""
    window = st.integers(1, 6)
    out: dict = {}
    if model_type in ("mistral", "mixtral"):
        out["sliding_window"] = draw(st.one_of(st.none(), window))
    if model_type == "qwen2":
        out.update(use_sliding_window=draw(st.booleans()), sliding_window=draw(window),
                   max_window_layers=draw(st.integers(0, num_layers)))
    if model_type in ("gemma", "gemma2"):
        out["hidden_activation"] = draw(st.sampled_from([None, "gelu_pytorch_tanh", "gelu"]))
    if model_type == "gemma2":
        out.update(sliding_window=draw(window), query_pre_attn_scalar=draw(st.sampled_from([2, 16, 256])),
                   attn_logit_softcapping=draw(st.sampled_from([None, 0.5, 50.0])),
                   final_logit_softcapping=draw(st.sampled_from([None, 1.0, 30.0])))
    grok = model_type != "mixtral" and draw(st.integers(0, 4)) == 0
    if model_type == "mixtral" or grok:
        experts = draw(st.integers(1, 4))
        out.update(num_local_experts=experts,
                   num_experts_per_tok=draw(st.integers(1, experts)) if sparse_routing else experts,
                   norm_topk_prob=draw(st.booleans()), output_router_logits=draw(st.booleans()),
                   router_aux_loss_coef=draw(st.sampled_from([0.0, 0.02, 0.5])))
    if grok:
        out.update(sandwich_norm=True, attn_logit_softcapping=draw(st.sampled_from([0.5, 30.0])))
        if "scale_embeddings" not in FAMILIES[model_type].values:  # Gemma's modeling file always scales
            out["scale_embeddings"] = draw(st.booleans())
    return out


def family_examples() -> dict[str, ModelConfig]:
    """One tiny config per family, its switches on and its windows shorter than a 9-token
    sequence (for the demo and the family tests); keys name the example, `model_type` the family.
    They share their shapes (width 16, GQA 4/2 heads of width 8, decoupled from 16 / 4 as in
    Gemma, 2 layers), so an eager Flax session compiles each operation once for all of them. The
    init range 0.2 (HF: 0.02) gives attention scores and logits of order one, where the soft caps
    bite and the router's choices are clear-cut."""
    tiny = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, initializer_range=0.2)
    return {
        "llama2": ModelConfig.for_family("llama", **tiny, rope_scaling=RopeScaling("linear", factor=2.0)),
        "llama3": ModelConfig.for_family("llama", **tiny, rope_theta=500000.0, attention_bias=True, mlp_bias=True,
                                         rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                                                                  high_freq_factor=4.0,
                                                                  original_max_position_embeddings=16)),
        "mistral": ModelConfig.for_family("mistral", **tiny, sliding_window=4),
        "qwen2": ModelConfig.for_family("qwen2", **tiny, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=1, tie_word_embeddings=True),
        "gemma": ModelConfig.for_family("gemma", **tiny, hidden_act="gelu"),
        "gemma2": ModelConfig.for_family("gemma2", **tiny, sliding_window=3, query_pre_attn_scalar=6,
                                         attn_logit_softcapping=1.5, final_logit_softcapping=2.0),
        "mixtral": ModelConfig.for_family("mixtral", **tiny, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=5, output_router_logits=True, router_aux_loss_coef=0.1),
    }


@st.composite
def batches(draw, config: ModelConfig, max_batch: int = 3, max_len: int = 10,
            far_positions: bool = True, min_len: int = 1) -> Batch:
    """Token ids with left, right or no padding per row, position ids that may start far from 0
    (up to `max_position_embeddings`; for dynamic rope past it half the time, where its base
    changes), and labels for every head (`batch.head_labels(head)` gives a head's loss arguments).

    A row padded on a side has at least one pad slot and one real token. Left padding is the
    first choice (where hypothesis starts and shrinks to): it is where mask and position bugs
    hide. `min_len=2` keeps the math that a single token leaves vacuous (rotary, causal mask,
    softmax, next-token loss) in every example.
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len} and {max_len}")
    b = draw(st.integers(1, max_batch))
    t = draw(st.integers(min_len, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    # Real tokens avoid the pad id, so pooling by pad id finds exactly the padding.
    real = [v for v in range(config.vocab_size) if v != pad_id] or [0]
    ids = rng.choice(real, size=(b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    sides = []
    for row in range(b):
        can_pad = config.pad_token_id is not None and t > 1
        side = draw(st.sampled_from(["left", "right", "none"])) if can_pad else "none"
        sides.append(side)
        n_pad = draw(st.integers(1, t - 1)) if side != "none" else 0
        if side == "left":
            mask[row, :n_pad] = 0
        elif side == "right":
            mask[row, t - n_pad:] = 0
    ids = np.where(mask == 1, ids, pad_id)
    position_ids = None
    if far_positions and draw(st.booleans()):
        max_pos = config.max_position_embeddings
        if config.rope.rope_type == "dynamic" and draw(st.booleans()):
            # The last position past max_position_embeddings: the NTK base grows with the length.
            start = draw(st.integers(max(0, max_pos - t + 1), max_pos + 64))
        else:
            start = draw(st.integers(0, max(0, max_pos - t)))
        position_ids = np.broadcast_to(start + np.arange(t, dtype=np.int64), (b, t)).copy()
    return Batch(ids, mask, position_ids, padding=tuple(sides), **head_labels(config, mask, ids, rng))


def cases(config_strategy: st.SearchStrategy[ModelConfig] | None = None,
          **batch_kwargs) -> st.SearchStrategy[tuple[ModelConfig, Batch]]:
    """`(config, batch)` drawn as one value (`configs()` by default; `batch_kwargs` go to
    `batches`). Unlike drawing the batch from `data()` inside the test, this lets a test pin
    the cases that matter with `@example(case=(config, batch))`."""
    config_strategy = configs() if config_strategy is None else config_strategy
    return config_strategy.flatmap(lambda c: batches(c, **batch_kwargs).map(lambda b: (c, b)))


def heads() -> st.SearchStrategy[str]:
    """Head names: causal_lm, sequence_classification, question_answering (keys of `HEADS`)."""
    return st.sampled_from(tuple(HEADS))


def dtypes(include_half: bool = True) -> st.SearchStrategy[str]:
    """dtype names: float64 and float32, and bfloat16 / float16 when `include_half`."""
    names = ["float64", "float32"] + (["bfloat16", "float16"] if include_half else [])
    return st.sampled_from(names)
