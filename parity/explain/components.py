"""The explain site's pages, in the order data flows through the model, and which code,
parameters and measured rows belong to each.

A page names its code as mirrored pairs: `Code("layers/attention.py")` is every function and
method of that module in both twins (so a function a later change adds appears by itself);
`Code("model.py", "make_attention_mask")` one pair; `Code(..., focus=regex)` only the statements
whose text matches (the rest folds into one "alike" row). `shared` names the numpy halves the
twins share (one pane). Parameters are matched by `params` (a regex over HF names); a parameter
belongs to exactly one page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["COMPONENTS", "Code", "Component", "component_of_parameter", "component_of_row"]


@dataclass(frozen=True)
class Code:
    """Code shown on a page: pairs of one module, by name in the order given (shell-style
    patterns allowed: `KVCache.*`); `names` empty: every pair of the module not shown above it on
    the page, in source order, and the functions only one twin has. `title` heads the group."""

    module: str
    names: tuple[str, ...] = ()
    focus: str | None = None  # regex: show only matching statements of these pairs
    title: str | None = None


@dataclass(frozen=True)
class Component:
    """One page of the site."""

    slug: str
    title: str
    lead: str
    code: tuple[Code, ...] = ()
    shared: tuple[str, ...] = ()  # importable names of shared numpy functions shown in one pane
    params: str | None = None  # regex over HF parameter names owned by this page
    shapes: tuple[tuple[str, str], ...] = ()  # (value, shape in the axis legend)
    notes: tuple[str, ...] = ()
    figure: str | None = None  # a figure computed from the shared code (site._FIGURES)


COMPONENTS: tuple[Component, ...] = (
    Component(
        "embedding", "Token embedding",
        "Token ids become vectors by a table lookup: row `id` of `embed_tokens.weight`. Gemma then "
        "multiplies by sqrt(E), rounded to the activation dtype first. With tied embeddings the same "
        "table is the LM head (see causal LM).",
        code=(Code("model.py", ("DecoderModel.embed", "check_token_ids")),
              Code("model.py", ("DecoderModel.__init__", "DecoderModel.__call__"),
                   focus=r"embed|pad_token|scale_embeddings|hidden_size \*\* 0\.5|input_ids")),
        params=r"(^|\.)embed_tokens\.weight$",
        shapes=(("input_ids", "[B, T] int"), ("embed_tokens.weight", "[V, E]"), ("inputs_embeds", "[B, T, E]"))),
    Component(
        "rmsnorm", "RMSNorm",
        "Each vector is divided by its root mean square (statistics in float32, float64 for float64 "
        "models), then scaled per channel by `weight` (Gemma: by `1 + weight`). Where the cast back to "
        "the activation dtype happens differs between LLaMA and Gemma, and both twins follow HF.",
        code=(Code("layers/norm.py"), Code("layers/precision.py", title="the precision rule used by every layer")),
        params=r"norm\.weight$",
        shapes=(("hidden_states", "[B, T, E]"), ("variance", "[B, T, 1] float32"), ("weight", "[E]"),
                ("output", "[B, T, E]"))),
    Component(
        "rotary", "Rotary position embedding",
        "Positions enter attention as rotations of q and k: pairs of channels are rotated by angle "
        "position x inv_freq. The frequencies (default, linear, dynamic NTK, llama3) are "
        "computed once in numpy float64, shared by both twins, so the twins round them identically.",
        code=(Code("layers/rope.py"),),
        shared=("weights.shared.rope.rope_frequencies",),
        shapes=(("position_ids", "[B, T]"), ("inv_freq", "[D/2] float32"), ("cos, sin", "[B, T, D]"),
                ("q, k rotated", "[B, H, T, D], [B, K, T, D]")),
        figure="rope"),
    Component(
        "attention", "Attention",
        "Grouped-query attention: H query heads share K key/value heads. Scores q·k/sqrt(D) are "
        "optionally soft-capped (Gemma 2), masked (causal, padding, sliding window), soft-maxed in "
        "float32 and used to average the values. The KV cache is preallocated and written at an index.",
        code=(Code("layers/attention.py", ("Attention.*",),
                   title="The layer: project to q, k, v; rotate; write the cache; attend; project back"),
              Code("layers/attention.py", ("attention_forward", "soft_cap"),
                   title="Eager attention: scores, soft-cap, mask, softmax in float32"),
              Code("layers/attention.py", ("group_query_heads",),
                   title="GQA: each kv head serves a group of query heads, without copying it"),
              Code("layers/attention.py", ("KVCache.*",), title="KV cache: preallocated, written at an index"),
              Code("model.py", ("make_attention_mask",), title="Masks: causal, padding, sliding window"),
              Code("layers/attention.py", title="The rest of attention.py")),
        params=r"\.self_attn\.",
        shapes=(("hidden_states", "[B, T, E]"), ("query", "[B, H, T, D]"), ("key, value", "[B, K, T, D]"),
                ("cache keys/values", "[B, K, S, D]"), ("mask", "[B, 1, T, S] bool"),
                ("scores, weights", "[B, H, T, S]"), ("output", "[B, T, E]"))),
    Component(
        "mlp", "Gated MLP (SwiGLU / GeGLU)",
        "down(act(gate(x)) * up(x)): SiLU gives SwiGLU (LLaMA), tanh-GELU gives GeGLU (Gemma).",
        code=(Code("layers/mlp.py"),),
        params=r"\.mlp\.",
        shapes=(("x", "[B, T, E]"), ("gate(x), up(x)", "[B, T, I]"), ("output", "[B, T, E]"))),
    Component(
        "moe", "Mixture of experts",
        "A router picks k of X expert MLPs per token (Mixtral) and mixes their outputs with the "
        "renormalised router probabilities; an auxiliary loss keeps the experts balanced.",
        code=(Code("layers/moe.py"),),
        params=r"\.block_sparse_moe\.",
        shapes=(("x", "[N, E]  (N = B x T)"), ("router_logits", "[N, X]"), ("top-k weights, experts", "[N, k]"),
                ("expert output", "[N, E]"))),
    Component(
        "decoder-layer", "Decoder layer",
        "Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). Gemma 2 adds sandwich "
        "norms after each sublayer; Mixtral swaps the MLP for the MoE block. Its norms' parameters are "
        "on the RMSNorm page, its sublayers' on theirs.",
        code=(Code("model.py", ("DecoderLayer.__init__", "DecoderLayer.__call__")),),
        shapes=(("hidden_states", "[B, T, E]"), ("attention weights", "[B, H, T, S]"),
                ("output", "[B, T, E]"))),
    Component(
        "model", "Decoder model",
        "Embedding, rotary tables and masks built once, the N decoder layers in turn, the final norm. "
        "HF's convention: the last hidden state is the normed one.",
        code=(Code("model.py", ("DecoderModel.__init__", "DecoderModel.embed", "DecoderModel.__call__")),),
        shapes=(("input_ids", "[B, T]"), ("hidden_states (each layer)", "[B, T, E]"),
                ("last_hidden_state", "[B, T, E]"))),
    Component(
        "causal-lm", "Causal LM head and loss",
        "Logits = hidden states x lm_head (or the embedding table, tied), soft-capped for Gemma 2; the "
        "loss is next-token cross-entropy in float32, ignoring label -100.",
        code=(Code("heads.py", ("ForCausalLM.__init__", "ForCausalLM.logits", "ForCausalLM.__call__",
                                "cross_entropy", "causal_lm_loss", "ForCausalLM.generate")),),
        params=r"^lm_head\.",
        shapes=(("last_hidden_state", "[B, T, E]"), ("lm_head.weight", "[V, E]"), ("logits", "[B, T, V]"),
                ("loss", "[] float32"))),
    Component(
        "sequence-classification", "Sequence classification head and loss",
        "Scores every token, then reads each row at its last non-pad token; the loss is MSE, "
        "cross-entropy or multi-label BCE by HF's `problem_type` rule.",
        code=(Code("heads.py", ("ForSequenceClassification.__init__", "ForSequenceClassification.__call__",
                                "last_token_index", "sequence_classification_loss")),),
        params=r"^score\.",
        shapes=(("last_hidden_state", "[B, T, E]"), ("score.weight", "[C, E]"), ("logits", "[B, C]"))),
    Component(
        "question-answering", "Question answering head and loss",
        "A linear map to two numbers per token: start and end logits of the answer span; the loss "
        "averages the two cross-entropies (positions outside the sequence ignored).",
        code=(Code("heads.py", ("ForQuestionAnswering.__init__", "ForQuestionAnswering.__call__",
                                "question_answering_loss")),),
        params=r"^qa_outputs\.",
        shapes=(("last_hidden_state", "[B, T, E]"), ("qa_outputs.weight", "[2, E]"),
                ("start_logits, end_logits", "[B, T]"))),
    Component(
        "generate", "Generation: greedy, sampling, beam search",
        "Prefill the prompt into a static KV cache, then one token per step. Sampling noise comes from "
        "one framework-neutral numpy generator, so both twins draw the same tokens.",
        code=(Code("generation.py"),),
        shapes=(("prompt", "[B, P]"), ("cache", "[B, K, P + N, D] per layer"), ("next-token logits", "[B, V]"),
                ("sequences", "[B, P + N]"))),
    Component(
        "serving", "Serving: continuous batching",
        "A runner keeps a fixed number of slots, each a row of one KV cache with its own length. A "
        "request is prefilled into a free slot at a padded bucket length; one decode step then "
        "advances every active slot, each with its own sampling settings, running only the first R "
        "slots that hold them all (requests take the lowest free slot). The slot bookkeeping is "
        "shared numpy, so both twins admit and retire requests in the same order.",
        code=(Code("serving.py"),),
        shapes=(("cache", "[S, K, L, D] per layer, length [S]"), ("prefill prompt", "[1, bucket]"),
                ("decode tokens", "[R], R <= S"), ("next-token logits", "[R, V]"))),
    Component(
        "training", "Training: AdamW, accumulation, dropout",
        "One step: the loss of each micro-batch weighted by its share of the counted labels (so "
        "accumulation equals one big batch), global-norm clipping, AdamW on a warmup + cosine "
        "schedule with no decay on biases and norm gains. Dropout masks come from a counter-based "
        "hash of seed, step, layer, site and element, so both twins drop the same elements.",
        code=(Code("training.py"), Code("layers/dropout.py", title="Dropout: the same mask in both twins")),
        shared=("weights.shared.dropout.keep_mask",)),
    Component(
        "sharding", "Sharding: one partition table, two engines",
        "One table maps HF tensor-name patterns to mesh axes (data, fsdp, tensor). JAX places each "
        "parameter with a NamedSharding and lets the compiler insert the collectives; torch turns the "
        "same table into tensor-parallel styles and FSDP2 shards. Activations are constrained only "
        "at layer boundaries.",
        code=(Code("sharding.py"),),
        shared=("weights.partition.partition_spec",)),
    Component(
        "converter", "The converter's rule for each parameter",
        "One table turns an HF tensor name into a Flax NNX path: a linear layer's `weight [out, in]` "
        "becomes `kernel [in, out]` (transposed), an embedding's `weight` becomes `embedding`, a norm's "
        "`weight` stays. There are no per-model special cases; each twin's loader applies it.",
        code=(Code("checkpoint.py"),),
        shared=("weights.names.flax_path", "weights.names.hf_name", "weights.names.is_transposed"),
        figure="converter"),
    Component(
        "vq-attention", "Transformer-VQ attention",
        "Keys are vector-quantized to a learned codebook, so attention over the whole past is a sum "
        "over codewords kept in a compressed cache: linear time in the sequence length.",
        code=(Code("vq/attention.py"),)),
    Component(
        "vq-quantizer", "Transformer-VQ quantizer",
        "Nearest-codeword assignment with a straight-through gradient, and the codebook's EMA update "
        "expressed as a loss.",
        code=(Code("vq/quantizer.py"),)),
)

BY_SLUG = {c.slug: c for c in COMPONENTS}


def component_of_parameter(hf_name: str) -> str | None:
    """The page that owns an HF parameter (None: no page claims it)."""
    owners = [c.slug for c in COMPONENTS if c.params and re.search(c.params, hf_name)]
    if len(owners) > 1:
        raise ValueError(f"{hf_name} is claimed by several pages: {owners}")
    return owners[0] if owners else None


_HEAD_PAGES = {"causal_lm": "causal-lm", "sequence_classification": "sequence-classification",
               "question_answering": "question-answering"}


def component_of_row(section: str, name: str, head: str) -> str:
    """The page a report row belongs to (the first divergent component of a failing check)."""
    if section == "forward":
        if name.endswith("(embeddings)") or name == "hidden_states.0":  # check / compare spellings
            return "embedding"
        if name.endswith("(attention weights)"):
            return "attention"
        return "decoder-layer"
    if section == "head":
        return _HEAD_PAGES.get(head, "causal-lm")
    if section == "gradients":
        return component_of_parameter(name) or "model"
    if section == "kv cache":
        return "attention"
    if section == "generation":
        return "generate"
    return "model"
