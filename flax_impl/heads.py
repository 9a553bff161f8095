"""The three task heads on top of `DecoderModel`, and their losses (HF `LlamaFor*`).

Losses are computed in float32 (float64 for float64 models). A loss over zero counted items
(every label ignored) is defined as 0 with zero gradients; HF's mean gives NaN there.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from weights.config import ModelConfig
from weights.names import IGNORE_INDEX

from .checkpoint import Pretrained, Trainable
from .generation import GenerationOutput, generate
from .layers.attention import KVCache, soft_cap
from .layers.linear import linear
from .layers.moe import current_token_mask, load_balancing_loss
from .layers.precision import DEFAULT_PRECISION, compute_dtype
from .model import DecoderModel


@flax.struct.dataclass
class CausalLMOutput:
    """`ForCausalLM` output: logits `[B, T, V]`; with experts and `output_router_logits`, the
    load-balancing `aux_loss` (already added to `loss`, times `router_aux_loss_coef`) and the
    per-layer `router_logits` `[B * T, X]`."""

    loss: jax.Array | None = None
    logits: jax.Array | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    aux_loss: jax.Array | None = None
    router_logits: tuple[jax.Array, ...] | None = None


@flax.struct.dataclass
class SequenceClassifierOutput:
    """`ForSequenceClassification` output: pooled logits `[B, num_labels]`."""

    loss: jax.Array | None = None
    logits: jax.Array | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


@flax.struct.dataclass
class QuestionAnsweringOutput:
    """`ForQuestionAnswering` output: span logits `[B, T]` each."""

    loss: jax.Array | None = None
    start_logits: jax.Array | None = None
    end_logits: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int) -> jax.Array:
    """Mean negative log-likelihood of `labels [N]` under `logits [N, C]`, skipping `ignore_index`."""
    logits = logits.astype(compute_dtype(logits.dtype))
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, jnp.zeros_like(labels))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe[:, None], axis=-1)[:, 0]
    nll = jnp.where(valid, nll, jnp.zeros_like(nll))
    return nll.sum() / jnp.maximum(valid.sum(), 1).astype(nll.dtype)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Next-token loss: position t predicts label t + 1; labels equal to -100 are ignored."""
    shift_labels = jnp.pad(labels, ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)[:, 1:]
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), IGNORE_INDEX)


def sequence_classification_loss(logits: jax.Array, labels: jax.Array, config: ModelConfig) -> jax.Array:
    """MSE, cross-entropy or BCE-with-logits by `problem_type`, inferred as HF does when unset."""
    problem_type = config.problem_type
    if problem_type is None:
        if config.num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    x = logits.astype(compute_dtype(logits.dtype))
    if problem_type == "regression":
        y = labels.astype(x.dtype)
        return ((x.squeeze() - y.squeeze()) ** 2).mean() if config.num_labels == 1 else ((x - y) ** 2).mean()
    if problem_type == "single_label_classification":
        return cross_entropy(x.reshape(-1, config.num_labels), labels.reshape(-1), IGNORE_INDEX)
    y = labels.astype(x.dtype)
    # The stable form of -[y log sigmoid(x) + (1 - y) log sigmoid(-x)].
    return (jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))).mean()


def question_answering_loss(start_logits: jax.Array, end_logits: jax.Array,
                            start_positions: jax.Array, end_positions: jax.Array) -> jax.Array:
    """Mean of start and end cross-entropies. As in HF, positions are clamped to `[0, T]` and
    `T` (past the sequence) is ignored; a negative position therefore counts as position 0."""
    ignored_index = start_logits.shape[1]
    start_positions = jnp.clip(start_positions.reshape(-1), 0, ignored_index)
    end_positions = jnp.clip(end_positions.reshape(-1), 0, ignored_index)
    start_loss = cross_entropy(start_logits, start_positions, ignored_index)
    end_loss = cross_entropy(end_logits, end_positions, ignored_index)
    return (start_loss + end_loss) / 2


def last_token_index(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """Each row's rightmost non-pad token `[B]` (works for left and right padding)."""
    b, t = input_ids.shape
    if pad_token_id is None:
        if b != 1:
            raise ValueError("ForSequenceClassification: a batch of more than one row needs "
                             "config.pad_token_id to find each row's last token")
        return jnp.full((b,), t - 1, dtype=jnp.int32)
    non_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(t, dtype=jnp.int32) * non_pad, axis=-1)


class ForCausalLM(Pretrained, Trainable, nnx.Module):
    """Decoder + `lm_head` (no bias); with `tie_word_embeddings` the head is the embedding matrix."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype | None = None, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        self.config = config
        self.precision = precision
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.model = DecoderModel(config, **kw)
        # One assignment: NNX fixes an attribute as data or static at its first assignment.
        self.lm_head = None if config.tie_word_embeddings else linear(
            config, config.hidden_size, config.vocab_size, False, **kw)

    def logits(self, hidden_states: jax.Array) -> jax.Array:
        """`[B, T, E] -> [B, T, V]`, soft-capped with `final_logit_softcapping` (Gemma 2)."""
        if self.lm_head is None:  # tied: the embedding table, cast at use like every weight
            table = self.model.embed_tokens.embedding[...].astype(hidden_states.dtype)
            logits = jnp.matmul(hidden_states, table.T, precision=self.precision)
        else:
            logits = self.lm_head(hidden_states)
        if self.config.final_logit_softcapping is not None:
            logits = soft_cap(logits, self.config.final_logit_softcapping)
        return logits

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, past_key_values: KVCache | None = None,
                 labels: jax.Array | None = None, use_cache: bool = False,
                 output_hidden_states: bool = False, output_attentions: bool = False,
                dropout_key: jax.Array | None = None) -> CausalLMOutput:
        past_length = past_key_values.length if past_key_values is not None else 0  # before the model advances it
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                         dropout_key=dropout_key)
        logits = self.logits(out.last_hidden_state)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        aux_loss = None
        if out.router_logits is not None:  # HF Mixtral: the aux loss over this call's real tokens
            token_mask = current_token_mask(attention_mask, past_length, input_ids.shape[1])
            aux_loss = load_balancing_loss(out.router_logits, self.config.num_local_experts,
                                           self.config.num_experts_per_tok, token_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.astype(loss.dtype)
        return CausalLMOutput(loss, logits, out.past_key_values, out.hidden_states, out.attentions, aux_loss,
                              out.router_logits)

    def generate(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, **kwargs
                 ) -> jax.Array | GenerationOutput:
        """Continue the prompts: `generation.generate(self, input_ids, attention_mask, **kwargs)`."""
        return generate(self, input_ids, attention_mask, **kwargs)


class ForSequenceClassification(Pretrained, Trainable, nnx.Module):
    """Decoder + `score` (no bias) read at each row's last non-pad token."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype | None = None, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.model = DecoderModel(config, **kw)
        self.score = linear(config, config.hidden_size, config.num_labels, False, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, past_key_values: KVCache | None = None,
                 labels: jax.Array | None = None, use_cache: bool = False,
                 output_hidden_states: bool = False, output_attentions: bool = False,
                dropout_key: jax.Array | None = None) -> SequenceClassifierOutput:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                         dropout_key=dropout_key)
        logits = self.score(out.last_hidden_state)  # [B, T, num_labels]
        last = last_token_index(input_ids, self.config.pad_token_id)
        pooled = logits[jnp.arange(logits.shape[0]), last]
        loss = sequence_classification_loss(pooled, labels, self.config) if labels is not None else None
        return SequenceClassifierOutput(loss, pooled, out.past_key_values, out.hidden_states, out.attentions)


class ForQuestionAnswering(Pretrained, Trainable, nnx.Module):
    """Decoder + `qa_outputs` (hidden -> 2, with bias) giving start and end logits per token."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype | None = None, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.model = DecoderModel(config, **kw)
        self.qa_outputs = linear(config, config.hidden_size, 2, True, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, start_positions: jax.Array | None = None,
                 end_positions: jax.Array | None = None, output_hidden_states: bool = False,
                 output_attentions: bool = False, dropout_key: jax.Array | None = None) -> QuestionAnsweringOutput:
        out = self.model(input_ids, attention_mask, position_ids,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                         dropout_key=dropout_key)
        logits = self.qa_outputs(out.last_hidden_state)  # [B, T, 2]
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringOutput(loss, start_logits, end_logits, out.hidden_states, out.attentions)
