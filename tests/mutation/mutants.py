"""The planted bugs of `make mutants`: each one a realistic mistake, applied to a copy of the
repository, that the test suite must catch.

An `Edit` replaces the one occurrence of `original` in `file` with `mutated`; a `Mutant` is one
or more edits (a bug made in both twins is an edit per twin) with a reason it is realistic and
its guard tests (node-id prefixes the harness runs first; the rest of the suite follows, so a
guard list that misses is slow, never wrong). Snippets are matched exactly: when the code moves
on and a snippet is no longer found exactly once, the harness reports the mutant "stale" —
update the snippet here (keep the bug), do not drop the mutant.

To add one: plant the bug by hand, run `python -m tests.mutation -k <name>`, and if the suite
misses it, add the test that catches it first. The list covers every numpy function the twins
share (weights/shared/), every family switch (weights/config.py, weights/families.py, the
twins' layers), every head and loss, and the converter.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Edit", "MUTANTS", "Mutant"]


@dataclass(frozen=True)
class Edit:
    """Replace the one occurrence of `original` in `file` (relative to the repository root)."""

    file: str
    original: str
    mutated: str


@dataclass(frozen=True)
class Mutant:
    """One planted bug: its edits, why it is a realistic mistake, and the tests to run first."""

    name: str
    why: str
    edits: tuple[Edit, ...]
    guards: tuple[str, ...]


def twins(path: str, torch_original: str, torch_mutated: str, flax_original: str, flax_mutated: str
          ) -> tuple[Edit, Edit]:
    """The same bug in `torch_impl/<path>` and `flax_impl/<path>`: one twin-parity cannot see."""
    return Edit(f"torch_impl/{path}", torch_original, torch_mutated), Edit(f"flax_impl/{path}", flax_original, flax_mutated)


WITNESS = "tests/twins/test_reference_witness.py"
SHARED = "tests/weights/test_shared_witnesses.py"
HF = "tests/twins/test_families_witness.py"
GEN_HF = "tests/twins/test_generation_witness.py"
SAMPLING = "tests/twins/test_generation_sampling.py"
FAMILIES = "tests/twins/test_families.py"
HEADS = "tests/twins/test_heads.py"
KV = "tests/twins/test_kv_cache.py"
CONVERT = "tests/weights/test_convert.py"

MUTANTS: list[Mutant] = [
    # ---- the bugs of issue 21 ------------------------------------------------------------------
    Mutant("cls-pools-first-token",
           "pooling 'the first real token' is what an argmax over the non-pad mask gives; HF pools the last",
           twins("heads.py",
                 "return (torch.arange(t, device=input_ids.device) * non_pad).argmax(-1)", "return non_pad.argmax(-1)",
                 "return jnp.argmax(jnp.arange(t, dtype=jnp.int32) * non_pad, axis=-1)",
                 "return jnp.argmax(non_pad, axis=-1)"),
           (WITNESS, HEADS)),
    Mutant("beams-to-keep-num-beams",
           "keeping only num_beams candidates per step looks natural; HF keeps max(2, 1 + n_eos) * num_beams "
           "so beams that hit eos do not starve the running set",
           (Edit("weights/shared/generation.py", "return max(2, 1 + len(self.eos_token_ids)) * self.num_beams",
                 "return self.num_beams"),),
           (GEN_HF,)),
    Mutant("sampling-noise-step-0-reused",
           "indexing the noise by a loop variable that never advances: every step reuses step 0's uniform",
           twins("generation.py",
                 "token = sample_from_weights(weights, noise[state.step])", "token = sample_from_weights(weights, noise[0])",
                 "token = sample_from_weights(weights, noise[state.step])", "token = sample_from_weights(weights, noise[0])"),
           (f"{SAMPLING}::test_unfiltered_sampling_follows_the_model_distribution", SAMPLING)),
    Mutant("dynamic-ntk-exponent",
           "the NTK exponent d/(d-2) misremembered as d/(d-1)",
           (Edit("weights/shared/rope.py", "** (dim / (dim - 2))", "** (dim / (dim - 1))"),),
           (SHARED, WITNESS)),
    Mutant("sliding-window-off-by-one",
           "'within w slots' read as i - j <= w: the window admits w + 1 keys",
           twins("model.py",
                 "keep = keep & (q_index - k_index < sliding_window)",
                 "keep = keep & (q_index - k_index <= sliding_window)",
                 "keep = keep & (q_index - k_index < sliding_window)",
                 "keep = keep & (q_index - k_index <= sliding_window)"),
           (WITNESS, HF)),
    Mutant("rmsnorm-eps-outside-sqrt",
           "x / (sqrt(var) + eps), the LayerNorm-style epsilon placement, instead of x / sqrt(var + eps)",
           twins("layers/norm.py",
                 "x = x * torch.rsqrt(variance + eps)", "x = x / (torch.sqrt(variance) + eps)",
                 "x = x * jax.lax.rsqrt(variance + eps)", "x = x / (jnp.sqrt(variance) + eps)"),
           (WITNESS, HF)),
    # ---- shared numpy: weights/shared/rope.py --------------------------------------------------
    Mutant("rope-exponent-step",
           "frequencies theta^(-i/d) over i = 0..d/2-1 instead of theta^(-2i/d): arange(d/2) for arange(0, d, 2)",
           (Edit("weights/shared/rope.py", "np.arange(0, dim, 2, dtype=np.int64)", "np.arange(0, dim // 2, dtype=np.int64)"),),
           (SHARED, WITNESS)),
    Mutant("rope-linear-multiplies",
           "linear scaling multiplies the frequencies by the factor instead of dividing",
           (Edit("weights/shared/rope.py", "inv_freq = inv_freq / rope.factor", "inv_freq = inv_freq * rope.factor"),),
           (SHARED, WITNESS)),
    Mutant("rope-llama3-smoothing-swapped",
           "the llama3 interpolation weights swapped: smooth * f / factor + (1 - smooth) * f",
           (Edit("weights/shared/rope.py", "smoothed = (1 - smooth) * scaled / factor + smooth * scaled",
                 "smoothed = smooth * scaled / factor + (1 - smooth) * scaled"),),
           (SHARED, WITNESS)),
    Mutant("rope-llama3-bands-swapped",
           "the two band edges swapped: old_context / high for the low-frequency edge",
           (Edit("weights/shared/rope.py", "low_freq_wavelen = old_context / low", "low_freq_wavelen = old_context / high"),),
           (SHARED, WITNESS)),
    # ---- shared numpy: weights/shared/generation.py ----------------------------------------------
    Mutant("position-ids-off-by-one",
           "cumsum(mask) without the - 1: the first real token gets position 1",
           (Edit("weights/shared/generation.py", "np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None)",
                 "np.clip(np.cumsum(attention_mask, axis=-1), 0, None)"),),
           (SHARED,)),
    Mutant("position-ids-no-clip",
           "dropping the clip: leading pads get position -1",
           (Edit("weights/shared/generation.py", "np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None)",
                 "(np.cumsum(attention_mask, axis=-1) - 1)"),),
           (SHARED,)),
    Mutant("pad-fallback-zero",
           "without pad_token_id, finished rows padded with 0 instead of the first eos token (HF's rule)",
           (Edit("weights/shared/generation.py", "else (eos[0] if eos else 0)", "else 0"),),
           (SHARED, GEN_HF)),
    Mutant("eos-order-lost",
           "eos ids deduplicated through a set: their order, hence the pad fallback eos[0], is lost",
           (Edit("weights/shared/generation.py", "return tuple(int(e) for e in eos_token_id)",
                 "return tuple(set(int(e) for e in eos_token_id))"),),
           (SHARED, GEN_HF)),
    Mutant("sampling-noise-one-row-per-seed",
           "one uniform per row, repeated at every step: a [1, B] draw broadcast to [steps, B]",
           (Edit("weights/shared/generation.py", "return np.random.default_rng(seed).random((steps, batch_size))",
                 "return np.repeat(np.random.default_rng(seed).random((1, batch_size)), steps, axis=0)"),),
           (SHARED, SAMPLING)),
    Mutant("sampling-noise-seed-ignored",
           "the generator seeded with a constant: every seed samples the same tokens",
           (Edit("weights/shared/generation.py", "return np.random.default_rng(seed).random((steps, batch_size))",
                 "return np.random.default_rng(0).random((steps, batch_size))"),),
           (SHARED, SAMPLING)),
    Mutant("bucket-length-one-too-big",
           "next power of two of length instead of length - 1: 16 tokens compile for 32",
           (Edit("weights/shared/generation.py", "1 << (int(length) - 1).bit_length()", "1 << int(length).bit_length()"),),
           ("tests/twins/test_generation.py::test_bucket_length",)),
    # ---- family switches: weights/config.py, weights/families.py, the twins' layers ---------------
    Mutant("gemma2-alternation-swapped",
           "Gemma 2's global layers taken as i % 2 == 0 instead of (i + 1) % 2 == 0",
           (Edit("weights/config.py", "(pattern is None or (i + 1) % pattern != 0)", "(pattern is None or i % pattern != 0)"),),
           (WITNESS, HF)),
    Mutant("qwen2-max-window-layers",
           "Qwen2's first sliding layer off by one: i > max_window_layers",
           (Edit("weights/config.py", "i >= self.max_window_layers", "i > self.max_window_layers"),),
           (WITNESS, HF)),
    Mutant("query-scalar-ignored",
           "Gemma 2's query_pre_attn_scalar ignored: scores scaled by head_dim ** -0.5",
           (Edit("weights/config.py",
                 "base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.resolved_head_dim",
                 "base = self.resolved_head_dim"),),
           (WITNESS, HF)),
    Mutant("qwen2-qkv-bias-dropped",
           "q/k/v bias read from attention_bias only: Qwen2's hard-coded bias disappears",
           (Edit("weights/config.py", "return self.attention_bias or self.qkv_bias", "return self.attention_bias"),),
           (WITNESS, HF)),
    Mutant("gemma-activation-fallback",
           "Gemma's MLP using hidden_act when hidden_activation is null (HF falls back to the tanh GELU)",
           (Edit("weights/config.py",
                 "return self.activation_fallback if self.activation_fallback is not None else self.hidden_act",
                 "return self.hidden_act"),),
           (WITNESS, HF)),
    Mutant("gemma-norm-offset-lost",
           "the family table forgets Gemma's hard-coded 1 + w norm",
           (Edit("weights/families.py", '"norm_unit_offset": True, "scale_embeddings": True,',
                 '"norm_unit_offset": False, "scale_embeddings": True,'),),
           (WITNESS, HF)),
    Mutant("embedding-scale-head-dim",
           "embeddings scaled by sqrt(head_dim) instead of sqrt(hidden_size)",
           twins("model.py",
                 "torch.tensor(self.config.hidden_size ** 0.5, dtype=hidden_states.dtype)",
                 "torch.tensor(self.config.resolved_head_dim ** 0.5, dtype=hidden_states.dtype)",
                 "jnp.asarray(self.config.hidden_size ** 0.5, dtype=hidden_states.dtype)",
                 "jnp.asarray(self.config.resolved_head_dim ** 0.5, dtype=hidden_states.dtype)"),
           (WITNESS, HF)),
    Mutant("attention-softcap-unscaled",
           "soft cap written cap * tanh(x) instead of cap * tanh(x / cap)",
           twins("layers/attention.py",
                 "return torch.tanh(x / cap) * cap", "return torch.tanh(x) * cap",
                 "return jnp.tanh(x / cap) * cap", "return jnp.tanh(x) * cap"),
           (WITNESS, HF)),
    Mutant("final-softcap-dropped",
           "the final logit cap forgotten in the LM head (only the attention cap kept)",
           twins("heads.py",
                 "logits = soft_cap(logits, self.config.final_logit_softcapping)", "logits = logits",
                 "logits = soft_cap(logits, self.config.final_logit_softcapping)", "logits = logits"),
           (WITNESS, HF)),
    Mutant("sandwich-post-ffn-norm-dropped",
           "the sandwich norm after the MLP forgotten (only the one after attention kept)",
           twins("model.py",
                 "hidden_states = self.post_feedforward_layernorm(hidden_states)", "hidden_states = hidden_states",
                 "hidden_states = self.post_feedforward_layernorm(hidden_states)", "hidden_states = hidden_states"),
           (WITNESS, HF)),
    Mutant("moe-always-renormalised",
           "top-k routing weights renormalised whatever norm_topk_prob says (Grok-1 keeps raw probabilities)",
           twins("layers/moe.py", "    if norm_topk_prob:\n", "    if True:\n", "    if norm_topk_prob:\n", "    if True:\n"),
           (WITNESS, "tests/twins/test_moe.py")),
    Mutant("aux-loss-counts-padding",
           "the load-balancing loss averaged over every token, padding included",
           twins("layers/moe.py",
                 "keep = attention_mask.reshape(1, -1).expand(layers, -1).reshape(-1).to(probs.dtype)",
                 "keep = torch.ones_like(attention_mask.reshape(1, -1).expand(layers, -1).reshape(-1)).to(probs.dtype)",
                 "keep = jnp.tile(attention_mask.reshape(-1), layers).astype(probs.dtype)",
                 "keep = jnp.ones_like(jnp.tile(attention_mask.reshape(-1), layers)).astype(probs.dtype)"),
           (WITNESS, HF)),
    Mutant("gqa-heads-interleaved",
           "query heads grouped as if kv heads were tiled (head h with kv h % K) instead of repeated per "
           "group (h // (H / K))",
           twins("layers/attention.py",
                 "return x.reshape(b, h // num_key_value_groups, num_key_value_groups * t, d)",
                 "return x.reshape(b, num_key_value_groups, h // num_key_value_groups, t, d).transpose(1, 2)"
                 ".reshape(b, h // num_key_value_groups, num_key_value_groups * t, d)",
                 "return x.reshape(b, h // num_key_value_groups, num_key_value_groups * t, d)",
                 "return x.reshape(b, num_key_value_groups, h // num_key_value_groups, t, d).transpose(0, 2, 1, 3, 4)"
                 ".reshape(b, h // num_key_value_groups, num_key_value_groups * t, d)"),
           (WITNESS, HF)),
    Mutant("causal-mask-excludes-self",
           "strict causal mask j < i: a token cannot attend to itself",
           twins("model.py",
                 "keep = k_index <= q_index", "keep = k_index < q_index",
                 "keep = k_index <= q_index", "keep = k_index < q_index"),
           (WITNESS, KV)),
    # ---- precision: cast order --------------------------------------------------------------------
    Mutant("gemma-norm-cast-before-multiply",
           "Gemma's (1 + w) applied after casting back (the LLaMA order); HF multiplies in float32 first",
           twins("layers/norm.py",
                 "return (x * (1.0 + weight.to(x.dtype))).to(input_dtype)", "return x.to(input_dtype) * (1.0 + weight)",
                 "return (x * (1.0 + weight.astype(x.dtype))).astype(input_dtype)",
                 "return x.astype(input_dtype) * (1.0 + weight)"),
           (f"{FAMILIES}::test_gemma_casts_follow_hf_in_bfloat16",)),
    # ---- caches and decoding ------------------------------------------------------------------------
    Mutant("default-positions-ignore-cache",
           "default position ids restart at 0 on every call, ignoring the cached length",
           twins("model.py",
                 "position_ids = (torch.as_tensor(past_length, device=inputs_embeds.device).reshape(-1, 1)\n",
                 "position_ids = (0 * torch.as_tensor(past_length, device=inputs_embeds.device).reshape(-1, 1)\n",
                 "position_ids = jnp.asarray(past_length).reshape(-1, 1) + jnp.arange(",
                 "position_ids = 0 * jnp.asarray(past_length).reshape(-1, 1) + jnp.arange("),
           (f"{FAMILIES}::test_cached_decoding_equals_full_pass", KV)),
    Mutant("cache-query-index-ignores-past",
           "the causal mask built from query indices 0..T-1 instead of past_length + 0..T-1",
           twins("model.py",
                 "q_index = past + torch.arange(query_length, device=device)[:, None]",
                 "q_index = torch.arange(query_length, device=device)[:, None]",
                 "q_index = past + jnp.arange(query_length)[:, None]", "q_index = jnp.arange(query_length)[:, None]"),
           (KV,)),
    Mutant("decode-position-skips-one",
           "the decode step's position counted from the step instead of step - 1",
           (Edit("torch_impl/generation.py",
                 "token = state.tokens[:, state.step - 1:state.step]\n"
                 "        logits, cache = step(model, token, attention_mask, next_position + (state.step - 1), cache)",
                 "token = state.tokens[:, state.step - 1:state.step]\n"
                 "        logits, cache = step(model, token, attention_mask, next_position + state.step, cache)"),
            Edit("flax_impl/generation.py",
                 "token = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)\n"
                 "        logits, cache = next_logits(model, token, attention_mask, next_position + (state.step - 1), cache)",
                 "token = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)\n"
                 "        logits, cache = next_logits(model, token, attention_mask, next_position + state.step, cache)")),
           ("tests/twins/test_generation.py",)),
    Mutant("top-p-inclusive",
           "top-p keeps tokens while the mass before them is <= p (one token too many at exact boundaries)",
           twins("generation.py",
                 "count = (mass_before < p).sum(-1, keepdim=True).clamp(min=1)",
                 "count = (mass_before <= p).sum(-1, keepdim=True).clamp(min=1)",
                 "count = jnp.maximum((mass_before < p).sum(-1, keepdims=True), 1)",
                 "count = jnp.maximum((mass_before <= p).sum(-1, keepdims=True), 1)"),
           (SAMPLING,)),
    # ---- heads and losses ---------------------------------------------------------------------------
    Mutant("causal-lm-loss-unshifted",
           "next-token loss without the shift: position t scored against its own token",
           twins("heads.py",
                 "shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]", "shift_labels = labels",
                 "shift_labels = jnp.pad(labels, ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)[:, 1:]",
                 "shift_labels = labels"),
           (WITNESS, HF)),
    Mutant("loss-mean-counts-ignored",
           "cross-entropy averaged over every position, ignored (-100) ones included",
           twins("heads.py",
                 "return nll.sum() / valid.sum().clamp(min=1).to(nll.dtype)", "return nll.mean()",
                 "return nll.sum() / jnp.maximum(valid.sum(), 1).astype(nll.dtype)", "return nll.mean()"),
           (WITNESS, HF)),
    Mutant("qa-start-end-swapped",
           "qa_outputs columns read as (end, start) instead of HF's (start, end)",
           twins("heads.py",
                 "start_logits, end_logits = logits[..., 0], logits[..., 1]",
                 "start_logits, end_logits = logits[..., 1], logits[..., 0]",
                 "start_logits, end_logits = logits[..., 0], logits[..., 1]",
                 "start_logits, end_logits = logits[..., 1], logits[..., 0]"),
           (WITNESS,)),
    Mutant("qa-positions-clamped-inside",
           "span positions clamped to [0, T - 1]: a position past the sequence counts as the last token "
           "instead of being ignored",
           twins("heads.py",
                 "start_positions = start_positions.reshape(-1).clamp(0, ignored_index)",
                 "start_positions = start_positions.reshape(-1).clamp(0, ignored_index - 1)",
                 "start_positions = jnp.clip(start_positions.reshape(-1), 0, ignored_index)",
                 "start_positions = jnp.clip(start_positions.reshape(-1), 0, ignored_index - 1)"),
           (WITNESS, HEADS)),
    Mutant("regression-sums-labels",
           "multi-label regression summed over labels before the mean (MSE per row, not per element)",
           twins("heads.py",
                 "else ((x - y) ** 2).mean()", "else ((x - y) ** 2).sum(-1).mean()",
                 "else ((x - y) ** 2).mean()", "else ((x - y) ** 2).sum(-1).mean()"),
           (WITNESS,)),
    Mutant("bce-sign",
           "BCE-with-logits written max(x, 0) + x * y + log1p(exp(-|x|)): the sign of the x * y term flipped",
           twins("heads.py",
                 "return (x.clamp(min=0) - x * y + torch.log1p(torch.exp(-x.abs()))).mean()",
                 "return (x.clamp(min=0) + x * y + torch.log1p(torch.exp(-x.abs()))).mean()",
                 "return (jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))).mean()",
                 "return (jnp.maximum(x, 0) + x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))).mean()"),
           (WITNESS, HEADS)),
    # ---- the converter --------------------------------------------------------------------------------
    Mutant("convert-reshape-not-transpose",
           "a kernel laid out with reshape(out, in -> in, out) instead of a transpose: same shape, scrambled",
           (Edit("weights/convert.py", "out = arr.T if transpose else arr",
                 "out = arr.reshape(arr.shape[::-1]) if transpose else arr"),),
           (CONVERT,)),
]
