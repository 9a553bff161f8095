"""The three task heads on top of `DecoderModel`, and their losses (HF `LlamaFor*`).

Losses are computed in float32 (float64 for float64 models). A loss over zero counted items
(every label ignored) is defined as 0 with zero gradients; HF's mean gives NaN there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from weights.config import ModelConfig
from weights.names import IGNORE_INDEX

from .checkpoint import Pretrained, Trainable
from .generation import GenerationOutput, generate
from .layers.attention import KVCache, soft_cap
from .layers.linear import linear
from .layers.moe import current_token_mask, load_balancing_loss
from .layers.precision import compute_dtype
from .model import DecoderModel


@dataclass
class CausalLMOutput:
    """`ForCausalLM` output: logits `[B, T, V]`; with experts and `output_router_logits`, the
    load-balancing `aux_loss` (already added to `loss`, times `router_aux_loss_coef`) and the
    per-layer `router_logits` `[B * T, X]`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput:
    """`ForSequenceClassification` output: pooled logits `[B, num_labels]`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class QuestionAnsweringOutput:
    """`ForQuestionAnswering` output: span logits `[B, T]` each."""

    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean negative log-likelihood of `labels [N]` under `logits [N, C]`, skipping `ignore_index`."""
    logits = logits.to(compute_dtype(logits.dtype))
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, safe[:, None])[:, 0]
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    return nll.sum() / valid.sum().clamp(min=1).to(nll.dtype)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss: position t predicts label t + 1; labels equal to -100 are ignored."""
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), IGNORE_INDEX)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """MSE, cross-entropy or BCE-with-logits by `problem_type`, inferred as HF does when unset."""
    problem_type = config.problem_type
    if problem_type is None:
        if config.num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.int32, torch.int64):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    x = logits.to(compute_dtype(logits.dtype))
    if problem_type == "regression":
        y = labels.to(x.dtype)
        return ((x.squeeze() - y.squeeze()) ** 2).mean() if config.num_labels == 1 else ((x - y) ** 2).mean()
    if problem_type == "single_label_classification":
        return cross_entropy(x.reshape(-1, config.num_labels), labels.reshape(-1).long(), IGNORE_INDEX)
    y = labels.to(x.dtype)
    # The stable form of -[y log sigmoid(x) + (1 - y) log sigmoid(-x)].
    return (x.clamp(min=0) - x * y + torch.log1p(torch.exp(-x.abs()))).mean()


def question_answering_loss(start_logits: torch.Tensor, end_logits: torch.Tensor,
                            start_positions: torch.Tensor, end_positions: torch.Tensor) -> torch.Tensor:
    """Mean of start and end cross-entropies. As in HF, positions are clamped to `[0, T]` and
    `T` (past the sequence) is ignored; a negative position therefore counts as position 0."""
    ignored_index = start_logits.shape[1]
    start_positions = start_positions.reshape(-1).clamp(0, ignored_index)
    end_positions = end_positions.reshape(-1).clamp(0, ignored_index)
    start_loss = cross_entropy(start_logits, start_positions, ignored_index)
    end_loss = cross_entropy(end_logits, end_positions, ignored_index)
    return (start_loss + end_loss) / 2


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Each row's rightmost non-pad token `[B]` (works for left and right padding)."""
    b, t = input_ids.shape
    if pad_token_id is None:
        if b != 1:
            raise ValueError("ForSequenceClassification: a batch of more than one row needs "
                             "config.pad_token_id to find each row's last token")
        return torch.full((b,), t - 1, dtype=torch.long, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).to(torch.int64)
    return (torch.arange(t, device=input_ids.device) * non_pad).argmax(-1)


class ForCausalLM(Pretrained, Trainable, nn.Module):
    """Decoder + `lm_head` (no bias); with `tie_word_embeddings` the head is the embedding matrix."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32,
                 param_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.model = DecoderModel(config, **kw)
        # One assignment, as in the Flax twin (where it must be: NNX fixes an attribute's kind at its first).
        self.lm_head = None if config.tie_word_embeddings else linear(
            config, config.hidden_size, config.vocab_size, False, **kw)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, T, E] -> [B, T, V]`, soft-capped with `final_logit_softcapping` (Gemma 2)."""
        if self.lm_head is None:  # tied: the embedding table, cast at use like every weight
            table = self.model.embed_tokens.weight.to(hidden_states.dtype)
            logits = torch.matmul(hidden_states, table.T)
        else:
            logits = self.lm_head(hidden_states)
        if self.config.final_logit_softcapping is not None:
            logits = soft_cap(logits, self.config.final_logit_softcapping)
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                labels: torch.Tensor | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, output_attentions: bool = False,
                dropout_key: torch.Tensor | None = None) -> CausalLMOutput:
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
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.dtype)
        return CausalLMOutput(loss, logits, out.past_key_values, out.hidden_states, out.attentions, aux_loss,
                              out.router_logits)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
                 ) -> torch.Tensor | GenerationOutput:
        """Continue the prompts: `generation.generate(self, input_ids, attention_mask, **kwargs)`."""
        return generate(self, input_ids, attention_mask, **kwargs)


class ForSequenceClassification(Pretrained, Trainable, nn.Module):
    """Decoder + `score` (no bias) read at each row's last non-pad token."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32,
                 param_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.model = DecoderModel(config, **kw)
        self.score = linear(config, config.hidden_size, config.num_labels, False, **kw)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                labels: torch.Tensor | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, output_attentions: bool = False,
                dropout_key: torch.Tensor | None = None) -> SequenceClassifierOutput:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                         dropout_key=dropout_key)
        logits = self.score(out.last_hidden_state)  # [B, T, num_labels]
        last = last_token_index(input_ids, self.config.pad_token_id)
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), last]
        loss = sequence_classification_loss(pooled, labels, self.config) if labels is not None else None
        return SequenceClassifierOutput(loss, pooled, out.past_key_values, out.hidden_states, out.attentions)


class ForQuestionAnswering(Pretrained, Trainable, nn.Module):
    """Decoder + `qa_outputs` (hidden -> 2, with bias) giving start and end logits per token."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32,
                 param_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.model = DecoderModel(config, **kw)
        self.qa_outputs = linear(config, config.hidden_size, 2, True, **kw)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, dropout_key: torch.Tensor | None = None) -> QuestionAnsweringOutput:
        out = self.model(input_ids, attention_mask, position_ids,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                         dropout_key=dropout_key)
        logits = self.qa_outputs(out.last_hidden_state)  # [B, T, 2]
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringOutput(loss, start_logits, end_logits, out.hidden_states, out.attentions)
