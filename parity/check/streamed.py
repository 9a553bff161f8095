"""The layer-streamed check: both twins of a checkpoint, one decoder layer at a time.

The whole-model check (`pair.py`) holds both twins, and with gradients the Flax twin's gradients
too. Here only the embedding, the final norm and the head stay loaded; each decoder layer is read
from the memory-mapped checkpoint into both twins (`load_module`, the twins' own loader), run,
compared and dropped. Peak memory is about one layer in each framework with its gradients, plus
the embedding and head and the activations of one layer, whatever the depth.

Nothing is computed by a third implementation. The layers are the twins' own `DecoderLayer`s, and
everything around them (embedding and Gemma's scale, rotary tables, the mask of each sliding
window, final norm, head, losses, the MoE auxiliary loss) runs through each twin's own
`DecoderModel` and head forward, on a *shell*: the head model with its decoder layers replaced by
stand-ins. A stand-in either records what its layer is given (the prologue: embedded input,
rotary tables, mask) or hands back what the streamed layers computed (the epilogue: the last
hidden state and every layer's router logits), so the shell computes the head's outputs and loss.

Two figures per row, both against the torch twin (the reference):
- chained (`Row.comparison`): each twin feeds its own previous output forward, the end-to-end
  figure, equal to the whole-model check's;
- isolated (`Row.isolated`): the Flax layer is fed the torch twin's input to that layer (its
  incoming gradient too, for gradients), so the figure is the error this layer adds.
Gradients walk back from the loss through the layers, recomputing each layer from the hidden
state kept at its input and applying each twin's VJP (`torch.autograd`, `jax.vjp`): the Flax layer
once with its own incoming cotangent (chained), once with the torch twin's (isolated).

KV-cache decoding is checked in the same pass, layer-major: each layer, once loaded, decodes the
whole sequence one token at a time into its own small cache, and feeds its outputs to the next
layer; the arithmetic is that of the whole-model step loop. Greedy generation needs every layer
for each new token, so it is not streamed: its row says so.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import flax_impl
import torch_impl
from flax_impl.checkpoint import load_module as flax_load_module
from torch_impl.checkpoint import load_module as torch_load_module
from torch_impl.checkpoint import tensor_to_numpy
from weights.checkpoint import CheckpointReader
from weights.config import ModelConfig
from weights.errors import LOAD_ERRORS
from weights.names import hf_name, is_transposed
from weights.report import match_state

from ..compare import Comparison, compare
from ..inputs import HEADS, Batch
from ..loading import BadInputError, jax_dtype, torch_dtype
from ..report import SECTIONS, Report, Row
from .progress import Phases
from .rows import (capped_logit_scale, describe_batch, head_rows, kv_cache_rows, layer_of, to_jax, to_torch,
                   tolerance_for)

__all__ = ["GENERATION_SKIPPED", "check_streamed"]

GENERATION_SKIPPED = ("skipped: streamed check (greedy generation needs every layer for each new token; "
                      "the kv cache rows check cached decoding layer by layer; --no-stream runs it)")

# ---- stand-ins --------------------------------------------------------------------------------
# What a stand-in does when the shell calls it: `board(index, hidden, rotary, mask, cache)` returns
# a decoder layer's outputs `(hidden, attention weights, cache, router logits)`.
_BOARD: contextvars.ContextVar[Callable[..., tuple]] = contextvars.ContextVar("twinlm_streamed_board")


@contextlib.contextmanager
def _board(fn: Callable[..., tuple]) -> Iterator[None]:
    token = _BOARD.set(fn)
    try:
        yield
    finally:
        _BOARD.reset(token)


class TorchStandIn(torch.nn.Module):
    """Sits where the torch shell's decoder layer `index` was; the board answers its calls."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, hidden_states: Any, position_embeddings: Any, attention_mask: Any,
                past_key_value: Any = None, dropout_key: Any = None, is_causal: bool = False) -> tuple:
        # The check runs in eval mode (no dropout key), and each real layer is run on its own mask
        # (no `is_causal` needed): neither is passed on.
        return _BOARD.get()(self.index, hidden_states, position_embeddings, attention_mask, past_key_value)


class FlaxStandIn(nnx.Module):
    """Sits where the Flax shell's decoder layer `index` was; the board answers its calls."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, hidden_states: Any, position_embeddings: Any, attention_mask: Any,
                 past_key_value: Any = None, dropout_key: Any = None, is_causal: bool = False) -> tuple:
        # The check runs in eval mode (no dropout key), and each real layer is run on its own mask
        # (no `is_causal` needed): neither is passed on.
        return _BOARD.get()(self.index, hidden_states, position_embeddings, attention_mask, past_key_value)


@dataclass
class LayerInputs:
    """What the shell gives the decoder layers besides the hidden state."""

    rotary: tuple[Any, Any]  # (cos, sin), the same for every layer
    masks: list[Any]  # per layer: its keep-mask (its sliding window's)


def _capture(records: dict[int, tuple]) -> Callable[..., tuple]:
    """A board that records each layer's inputs and passes the hidden state through."""
    def board(index: int, hidden: Any, rotary: Any, mask: Any, cache: Any) -> tuple:
        records[index] = (hidden, rotary, mask)
        return hidden, None, cache, None
    return board


def _inject(hidden: Any, routers: list | None) -> Callable[..., tuple]:
    """A board that hands back the streamed last hidden state and each layer's router logits."""
    def board(index: int, _hidden: Any, _rotary: Any, _mask: Any, cache: Any) -> tuple:
        return hidden, None, cache, None if routers is None else routers[index]
    return board


def _layer_inputs(records: dict[int, tuple]) -> tuple[Any, LayerInputs]:
    return records[0][0], LayerInputs(records[0][1], [records[i][2] for i in range(len(records))])


# ---- the torch twin, streamed -------------------------------------------------------------
class TorchSide:
    """The torch twin of a checkpoint: its shell, and one `DecoderLayer` at a time.

    Every layer is built with `layer_idx` 0: the index only picks a layer's slot in a KV cache,
    and each streamed layer decodes into a one-layer cache of its own.
    """

    def __init__(self, config: ModelConfig, head: str, dtype: str, reader: CheckpointReader,
                 sources: Mapping[str, str]):
        self.config, self.head, self.reader, self.sources = config, head, reader, sources
        self.dtype = torch_dtype(dtype)
        with torch.device("meta"):
            shell = getattr(torch_impl, HEADS[head])(config, dtype=self.dtype)
        shell.model.layers = torch.nn.ModuleList([TorchStandIn(i) for i in range(config.num_hidden_layers)])
        self.shell = torch_load_module(shell, reader, {n: sources[n] for n in shell.state_dict()}).eval()
        self.decoder = self.shell.model  # outlives the head (`drop_head`)
        self._embedded: torch.Tensor | None = None

    def convert(self, x: Any) -> Any:
        """The torch twin's value as the Flax twin's input: same bits, same dtype."""
        return None if x is None else jnp.asarray(tensor_to_numpy(x))

    def _args(self, batch: Batch) -> tuple:
        return to_torch(batch.input_ids), to_torch(batch.attention_mask), to_torch(batch.position_ids)

    def inputs(self, batch: Batch, grads: bool) -> tuple[torch.Tensor, LayerInputs]:
        """The embedded input and what every layer is given, from the shell's own forward."""
        records: dict[int, tuple] = {}
        with torch.set_grad_enabled(grads), _board(_capture(records)):
            self.decoder(*self._args(batch))
        embedded, inputs = _layer_inputs(records)
        self._embedded = embedded if grads else None  # with its graph: the embedding's VJP, at the end
        return embedded.detach(), inputs

    def step_inputs(self, batch: Batch) -> list[LayerInputs]:
        """What every layer is given at each one-token decoding step (cache index = step)."""
        ids, mask, pos = self._args(batch)
        cache = _torch_cache(self.config, ids.shape[0], ids.shape[1], self.dtype)
        steps = []
        with torch.no_grad():
            for s in range(ids.shape[1]):
                records: dict[int, tuple] = {}
                with _board(_capture(records)):
                    cache = self.decoder(ids[:, s:s + 1], mask, None if pos is None else pos[:, s:s + 1],
                                         past_key_values=cache, use_cache=True).past_key_values
                steps.append(_layer_inputs(records)[1])
        return steps

    def layer(self, index: int) -> torch.nn.Module:
        """Decoder layer `index`, read from the checkpoint."""
        with torch.device("meta"):
            layer = torch_impl.DecoderLayer(self.config, 0, dtype=self.dtype)
        prefix = f"model.layers.{index}."
        return torch_load_module(layer, self.reader, {n: self.sources[prefix + n] for n in layer.state_dict()}).eval()

    def forward(self, layer: torch.nn.Module, hidden: torch.Tensor, inputs: LayerInputs, index: int) -> tuple:
        """`(output, attention weights, router logits or None)`."""
        with torch.no_grad():
            out, attn, _, router = layer(hidden, inputs.rotary, inputs.masks[index])
        return out, attn, router

    def decode(self, layer: torch.nn.Module, hidden: torch.Tensor, steps: list[LayerInputs], index: int,
               bar: Any) -> torch.Tensor:
        """The layer run one token at a time through its own cache: outputs `[B, T, E]`."""
        cache = _torch_cache(self.config, hidden.shape[0], hidden.shape[1], self.dtype)
        outs = []
        with torch.no_grad():
            for s, inputs in enumerate(steps):
                out, _, cache, _ = layer(hidden[:, s:s + 1], inputs.rotary, inputs.masks[index], cache)
                cache = cache.advance(1)
                outs.append(out)
                bar.update()
        return torch.cat(outs, dim=1)

    def backward(self, layer: torch.nn.Module, hidden: torch.Tensor, inputs: LayerInputs, index: int,
                 ct_hidden: torch.Tensor, ct_router: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The layer's VJP at `hidden`: `(input cotangent, {parameter name in the layer: gradient})`."""
        hidden = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            out, _, _, router = layer(hidden, inputs.rotary, inputs.masks[index])
            outputs, cotangents = [out], [ct_hidden]
            if router is not None and ct_router is not None:
                outputs.append(router)
                cotangents.append(ct_router)
            torch.autograd.backward(outputs, cotangents)
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}
        return hidden.grad, grads

    def run_head(self, batch: Batch, hidden: torch.Tensor, routers: list | None, grads: bool) -> tuple:
        """The shell's head forward on the streamed last hidden state (and router logits): `(outputs,
        its cotangent, the routers' cotangents, {shell parameter: gradient}, None)`. The head's share
        of a tied embedding's gradient stays in `.grad`, where `embedding_gradient` adds the rest."""
        hidden = hidden.detach().requires_grad_(grads)
        routers = None if routers is None else [r.detach().requires_grad_(grads) for r in routers]
        labels = {k: to_torch(v) for k, v in batch.head_labels(self.head).items()}
        with torch.set_grad_enabled(grads), _board(_inject(hidden, routers)):
            out = self.shell(*self._args(batch), **labels, output_hidden_states=True)
            if grads:
                out.loss.backward()
        if not grads:
            return out, None, None, {}, None
        shell_grads = {}
        for name, p in self.shell.named_parameters():
            if "embed_tokens" not in name:
                shell_grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = None
        return out, hidden.grad, None if routers is None else [r.grad for r in routers], shell_grads, None

    def decoded_head(self, batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
        """What the KV-cache rows compare, from the decoded last hidden state: the logits of the
        causal LM, the normed last hidden state otherwise."""
        with torch.no_grad(), _board(_inject(hidden, None)):
            last = self.shell.model(*self._args(batch)).last_hidden_state
            return self.shell.logits(last) if self.head == "causal_lm" else last

    def drop_head(self) -> None:
        """Free the head (the LM head is as big as the embedding): only the decoder's embedding
        is needed after the head's rows, for `embedding_gradient`."""
        self.shell = None

    def embedding_gradient(self, ct: torch.Tensor) -> dict[str, torch.Tensor]:
        """The embedding's VJP at the embedded input (added to the head's share when tied)."""
        torch.autograd.backward(self._embedded, ct)
        self._embedded = None
        p = self.decoder.embed_tokens.weight
        grad, p.grad = p.grad if p.grad is not None else torch.zeros_like(p), None
        return {"model.embed_tokens.weight": grad}


def _torch_cache(config: ModelConfig, b: int, t: int, dtype: torch.dtype) -> Any:
    shape = (b, config.resolved_num_key_value_heads, t, config.resolved_head_dim)
    return torch_impl.KVCache([torch.zeros(shape, dtype=dtype)], [torch.zeros(shape, dtype=dtype)],
                              torch.zeros(b, dtype=torch.int64))  # one write position per row


# ---- the Flax twin, streamed --------------------------------------------------------------
class FlaxSide:
    """The Flax twin of a checkpoint: its shell, and one `DecoderLayer` at a time (each built with
    `layer_idx` 0, so one compilation serves every layer). Every call into the shell is compiled
    too (`nnx.split` + `jax.jit`): a handful of compilations per model instead of one per
    primitive, and the parameters are never handed back out (see `pair._flax_run`)."""

    def __init__(self, config: ModelConfig, head: str, dtype: str, reader: CheckpointReader,
                 sources: Mapping[str, str]):
        self.config, self.head, self.reader, self.sources = config, head, reader, sources
        self.dtype = jax_dtype(dtype)
        cls = getattr(flax_impl, HEADS[head])
        shell = nnx.eval_shape(lambda: cls(config, dtype=self.dtype, param_dtype=self.dtype, rngs=nnx.Rngs(0)))
        shell.model.layers = nnx.List([FlaxStandIn(i) for i in range(config.num_hidden_layers)])
        self.shell = flax_load_module(shell, reader, {n: sources[n] for n in _param_names(shell)})
        self.decoder = self.shell.model  # outlives the head (`drop_head`)
        self._abstract_layer: nnx.Module | None = None

    def _args(self, batch: Batch) -> tuple:
        return to_jax(batch.input_ids), to_jax(batch.attention_mask), to_jax(batch.position_ids)

    def inputs(self, batch: Batch, grads: bool) -> tuple[jax.Array, LayerInputs]:
        """The embedded input and what every layer is given, from the shell's own forward."""
        embedded, rotary, masks = _flax_inputs(*nnx.split(self.decoder), *self._args(batch))
        return embedded, LayerInputs(rotary, masks)

    def step_inputs(self, batch: Batch) -> list[LayerInputs]:
        """What every layer is given at each one-token decoding step (cache index = step)."""
        ids, mask, pos = self._args(batch)
        graphdef, state = nnx.split(self.decoder)
        cache = _flax_cache(self.config, ids.shape[0], ids.shape[1], self.dtype)
        steps = []
        for s in range(ids.shape[1]):
            rotary, masks, cache = _flax_step_inputs(graphdef, state, ids[:, s:s + 1], mask,
                                                     None if pos is None else pos[:, s:s + 1], cache)
            steps.append(LayerInputs(rotary, masks))
        return steps

    def layer(self, index: int) -> tuple[nnx.GraphDef, nnx.State]:
        """Decoder layer `index`, read from the checkpoint, as `(graphdef, parameters)`."""
        if self._abstract_layer is None:  # traced once: every layer has the same structure
            self._abstract_layer = nnx.eval_shape(lambda: flax_impl.DecoderLayer(
                self.config, 0, dtype=self.dtype, param_dtype=self.dtype, rngs=nnx.Rngs(0)))
        layer = nnx.clone(self._abstract_layer)
        prefix = f"model.layers.{index}."
        layer = flax_load_module(layer, self.reader, {n: self.sources[prefix + n] for n in _param_names(layer)})
        return nnx.split(layer)

    def forward(self, layer: tuple, hidden: jax.Array, inputs: LayerInputs, index: int) -> tuple:
        """`(output, attention weights, router logits or None)`."""
        return _flax_layer(*layer, hidden, inputs.rotary, inputs.masks[index])

    def decode(self, layer: tuple, hidden: jax.Array, steps: list[LayerInputs], index: int, bar: Any) -> jax.Array:
        """The layer run one token at a time through its own cache: outputs `[B, T, E]`."""
        cache = _flax_cache(self.config, hidden.shape[0], hidden.shape[1], self.dtype)
        outs = []
        for s, inputs in enumerate(steps):
            out, cache = _flax_layer_step(*layer, hidden[:, s:s + 1], inputs.rotary, inputs.masks[index], cache)
            outs.append(out)
            bar.update()
        return jnp.concatenate(outs, axis=1)

    def backward(self, layer: tuple, hidden: jax.Array, inputs: LayerInputs, index: int, ct_hidden: jax.Array,
                 ct_router: jax.Array | None) -> tuple[jax.Array, dict]:
        """The layer's VJP at `hidden`: `(input cotangent, {parameter HF name in the layer: gradient})`."""
        g_params, g_hidden = _flax_layer_vjp(*layer, hidden, inputs.rotary, inputs.masks[index], ct_hidden,
                                             ct_router)
        return g_hidden, _named_grads(g_params)

    def run_head(self, batch: Batch, hidden: jax.Array, routers: list | None, grads: bool) -> tuple:
        """The shell's head forward on a last hidden state (and router logits): `(outputs, its
        cotangent, the routers' cotangents, {shell parameter: gradient}, the head's share of a tied
        embedding's gradient for `embedding_gradient`, or None)`."""
        labels = {k: to_jax(v) for k, v in batch.head_labels(self.head).items()}
        tied = self.config.tie_word_embeddings
        # Untied, the embedding gets no gradient here: leave it out rather than fill it with zeros.
        wrt = nnx.Param if tied else nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed_tokens")))
        graphdef, params, rest = nnx.split(self.shell, wrt, ...)
        out, g_params, g_inject = _flax_head(graphdef, params, rest, self._args(batch), labels,
                                             {"hidden": hidden, "routers": routers}, grads)
        if not grads:
            return out, None, None, {}, None
        shell_grads = _named_grads(g_params)
        share = {n: shell_grads.pop(n) for n in list(shell_grads) if "embed_tokens" in n} if tied else None
        return out, g_inject["hidden"], g_inject["routers"], shell_grads, share

    def decoded_head(self, batch: Batch, hidden: jax.Array) -> jax.Array:
        """What the KV-cache rows compare (see `TorchSide.decoded_head`)."""
        return _flax_decoded_head(*nnx.split(self.shell), self._args(batch), hidden, self.head == "causal_lm")

    def drop_head(self) -> None:
        """Free the head (see `TorchSide.drop_head`)."""
        self.shell = None

    def embedding_gradient(self, ct: jax.Array, batch: Batch, head_share: dict | None) -> dict[str, Any]:
        """The embedding's VJP at the embedded input, plus `head_share` (a tied embedding's share
        from the head, as `run_head` returned it)."""
        graphdef, params, rest = nnx.split(self.decoder, nnx.All(nnx.Param, nnx.PathContains("embed_tokens")), ...)
        grads = {f"model.{name}": grad for name, grad in
                 _named_grads(_flax_embedding_vjp(graphdef, params, rest, self._args(batch), ct)).items()}
        for name, value in (head_share or {}).items():
            grads[name] = value + grads[name]  # torch accumulates the head's share first, then this
        return grads


# The shell's compiled calls: a stand-in's board is set while the function is traced, and what it
# records (tracers) is returned, never kept.
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _flax_inputs(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array,
                 pos: jax.Array | None) -> tuple:
    records: dict[int, tuple] = {}
    with _board(_capture(records)):
        nnx.merge(graphdef, state)(ids, mask, pos)
    embedded, inputs = _layer_inputs(records)
    return embedded, inputs.rotary, inputs.masks


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _flax_step_inputs(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array,
                      pos: jax.Array | None, cache: Any) -> tuple:
    records: dict[int, tuple] = {}
    with _board(_capture(records)):
        cache = nnx.merge(graphdef, state)(ids, mask, pos, past_key_values=cache, use_cache=True).past_key_values
    _, inputs = _layer_inputs(records)
    return inputs.rotary, inputs.masks, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "grads"))
def _flax_head(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, args: tuple, labels: dict,
               inject: dict, grads: bool) -> tuple:
    def run(p: nnx.State, injected: dict) -> tuple[jax.Array, Any]:
        with _board(_inject(injected["hidden"], injected["routers"])):
            out = nnx.merge(graphdef, p, rest)(*args, **labels, output_hidden_states=True)
        return out.loss, out

    if not grads:
        return run(params, inject)[1], None, None
    (_, out), (g_params, g_inject) = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(params, inject)
    return out, g_params, g_inject


@functools.partial(jax.jit, static_argnames=("graphdef", "causal"))
def _flax_decoded_head(graphdef: nnx.GraphDef, state: nnx.State, args: tuple, hidden: jax.Array,
                       causal: bool) -> jax.Array:
    shell = nnx.merge(graphdef, state)
    with _board(_inject(hidden, None)):
        last = shell.model(*args).last_hidden_state
    return shell.logits(last) if causal else last


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _flax_embedding_vjp(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, args: tuple,
                        ct: jax.Array) -> nnx.State:
    def embedded(p: nnx.State) -> jax.Array:
        records: dict[int, tuple] = {}
        with _board(_capture(records)):
            nnx.merge(graphdef, p, rest)(*args)
        return records[0][0]

    return jax.vjp(embedded, params)[1](ct)[0]


def _param_names(module: nnx.Module) -> list[str]:
    return [hf_name(path) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))]


def _named_grads(state: nnx.State) -> dict[str, np.ndarray]:
    """HF name -> gradient in HF layout: kernels transposed back as numpy views of the device
    buffers (on CPU no copy; a jax `.T` would copy every kernel's gradient)."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        name = hf_name(path)
        value = np.asarray(var.get_value())
        out[name] = value.T if is_transposed(name) else value
    return out


def _flax_cache(config: ModelConfig, b: int, t: int, dtype: Any) -> Any:
    shape = (b, config.resolved_num_key_value_heads, t, config.resolved_head_dim)
    return flax_impl.KVCache((jnp.zeros(shape, dtype),), (jnp.zeros(shape, dtype),),
                             jnp.zeros(b, jnp.int32))  # one write position per row


# Compiled once per layer shape (every layer shares one graphdef), as users run the Flax twin.
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _flax_layer(graphdef: nnx.GraphDef, params: nnx.State, hidden: jax.Array, rotary: tuple,
                mask: jax.Array) -> tuple:
    out, attn, _, router = nnx.merge(graphdef, params)(hidden, rotary, mask)
    return out, attn, router


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _flax_layer_step(graphdef: nnx.GraphDef, params: nnx.State, hidden: jax.Array, rotary: tuple,
                     mask: jax.Array, cache: Any) -> tuple:
    out, _, cache, _ = nnx.merge(graphdef, params)(hidden, rotary, mask, cache)
    return out, cache.advance(1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _flax_layer_vjp(graphdef: nnx.GraphDef, params: nnx.State, hidden: jax.Array, rotary: tuple,
                    mask: jax.Array, ct_hidden: jax.Array, ct_router: jax.Array | None) -> tuple:
    def run(p: nnx.State, h: jax.Array) -> tuple:
        out, _, _, router = nnx.merge(graphdef, p)(h, rotary, mask)
        return out, router

    (_, router), vjp = jax.vjp(run, params, hidden)
    if router is not None and ct_router is None:  # router logits not in the loss: no cotangent
        ct_router = jnp.zeros_like(router)
    return vjp((ct_hidden, ct_router))


# ---- the check ----------------------------------------------------------------------------
def _reference_state(config: ModelConfig, head: str, dtype: str) -> tuple[dict, list[str]]:
    """`({name: (HF shape, dtype)}, parameter names in model order)` of the whole model, from
    the torch twin built on the meta device (no memory)."""
    with torch.device("meta"):
        model = getattr(torch_impl, HEADS[head])(config, dtype=torch_dtype(dtype))
    np_dtype = tensor_to_numpy(torch.zeros((), dtype=torch_dtype(dtype))).dtype
    return ({n: (tuple(p.shape), np_dtype) for n, p in model.state_dict().items()},
            [n for n, _ in model.named_parameters()])


def _sources(reader: CheckpointReader, expected: dict, config: ModelConfig) -> dict[str, str]:
    """Model name -> checkpoint tensor, every tensor checked (as `from_pretrained` checks them)."""
    try:
        return dict(match_state(expected, reader, tie_word_embeddings=config.tie_word_embeddings).sources)
    except LOAD_ERRORS as e:
        raise BadInputError(" ".join(str(e).split())) from None


def check_streamed(directory: str | os.PathLike, dtype: str, batch: Batch, *, config: ModelConfig, head: str,
                   flax_directory: str | os.PathLike | None = None, sections: Iterable[str] = SECTIONS,
                   title: str = "parity", tolerances: Mapping[str, float] | None = None,
                   progress: bool | None = None) -> Report:
    """The check of `check_pair`, streamed layer by layer from the checkpoint `directory` (the
    Flax twin from `flax_directory` when given): the same rows, with an isolated figure beside the
    chained one wherever a layer is involved. See the module docstring."""
    sections = tuple(sections)
    tol = lambda quantity: tolerance_for(dtype, quantity, tolerances)  # noqa: E731
    a, g = tol("activations"), tol("gradients")
    phases = Phases(progress)
    grads, kv = "gradients" in sections, "kv cache" in sections
    n = config.num_hidden_layers
    # The MoE auxiliary loss reads every layer's router logits: they go into the head with the
    # last hidden state, and their cotangents come back into each layer's VJP.
    routed = config.is_moe and config.output_router_logits
    forward: list[Row] = []
    gradients: dict[str, Row] = {}
    expected, order = _reference_state(config, head, dtype)
    with contextlib.ExitStack() as stack:
        t_reader = stack.enter_context(CheckpointReader(directory))
        f_reader = stack.enter_context(CheckpointReader(flax_directory)) if flax_directory else t_reader
        with phases("load", total=2, unit="twin") as bar:
            torch_side = TorchSide(config, head, dtype, t_reader, _sources(t_reader, expected, config))
            bar.update()
            flax_side = FlaxSide(config, head, dtype, f_reader, _sources(f_reader, expected, config))
            bar.update()
        iso = torch_side.convert  # the reference's value as the Flax twin's input

        with phases("forward + kv cache" if kv else "forward", total=n, unit="layer") as bar:
            t_x, t_in = torch_side.inputs(batch, grads)
            f_x, f_in = flax_side.inputs(batch, grads)
            forward.append(Row("forward", "activations", compare("model.embed_tokens (embeddings)", t_x, f_x, a)))
            if kv:
                t_steps, f_steps = torch_side.step_inputs(batch), flax_side.step_inputs(batch)
                t_dec, f_dec = t_x, f_x
            t_hidden, f_hidden, t_routers, f_routers = [t_x], [f_x], [], []
            for i in range(n):
                # One twin's layer at a time: the torch layer is dropped before the Flax one is read.
                t_layer = torch_side.layer(i)
                t_out, t_attn, t_router = torch_side.forward(t_layer, t_hidden[i], t_in, i)
                if kv:
                    t_dec = torch_side.decode(t_layer, t_dec, t_steps, i, _NoBar)
                del t_layer
                f_layer = flax_side.layer(i)
                f_out, f_attn, f_router = flax_side.forward(f_layer, f_hidden[i], f_in, i)
                i_out, i_attn, _ = flax_side.forward(f_layer, iso(t_hidden[i]), f_in, i)
                if kv:
                    f_dec = flax_side.decode(f_layer, f_dec, f_steps, i, _NoBar)
                del f_layer
                name = f"model.layers.{i}.self_attn (attention weights)"
                forward.append(Row("forward", "activations", compare(name, t_attn, f_attn, a), i,
                                   isolated=compare(name, t_attn, i_attn, a)))
                if i < n - 1:  # the last layer's row is after the final norm, from the head below
                    name = f"model.layers.{i} (output)"
                    forward.append(Row("forward", "activations", compare(name, t_out, f_out, a), i,
                                       isolated=compare(name, t_out, i_out, a)))
                t_hidden.append(t_out)
                f_hidden.append(f_out)
                t_routers.append(t_router)
                f_routers.append(f_router)
                del t_attn, f_attn, i_attn, i_out
                bar.update()

            t_head, t_ct, t_ct_routers, t_grads, _ = torch_side.run_head(
                batch, t_hidden[n], t_routers if routed else None, grads)
            f_head, f_ct, f_ct_routers, f_grads, f_tied_share = flax_side.run_head(
                batch, f_hidden[n], f_routers if routed else None, grads)
            _gradient_rows(gradients, t_grads, f_grads, g)
            del f_grads
            i_head, _, _, i_grads, i_tied_share = flax_side.run_head(
                batch, iso(t_hidden[n]), [iso(r) for r in t_routers] if routed else None, grads)
            _gradient_rows(gradients, t_grads, i_grads, g, isolated=True)
            del t_grads, i_grads
            name = f"model.layers.{n - 1} + model.norm (output)"
            forward.append(Row("forward", "activations",
                               compare(name, t_head.hidden_states[-1], f_head.hidden_states[-1], a), n - 1,
                               isolated=compare(name, t_head.hidden_states[-1], i_head.hidden_states[-1], a)))
            capped = capped_logit_scale(torch_side.shell, t_head, head)
            head_section = head_rows(t_head, f_head, head, tol, capped)
            for row, i_row in zip(head_section, head_rows(t_head, i_head, head, tol, capped)):
                row.isolated = i_row.comparison
            kv_rows: list[Row] = []
            if kv:
                kv_rows = kv_cache_rows(batch, head, t_head, f_head, torch_side.decoded_head(batch, t_dec),
                                        flax_side.decoded_head(batch, f_dec), tol, capped)
            del t_head, f_head, i_head
            # The head is done with (the backward pass needs the decoder's embedding only): free it.
            torch_side.drop_head()
            flax_side.drop_head()

        if grads:
            with phases("backward", total=n, unit="layer") as bar:
                t_ct_in, f_ct_in = t_ct, f_ct
                for i in reversed(range(n)):
                    t_r = t_ct_routers[i] if routed else None
                    f_r = f_ct_routers[i] if routed else None
                    t_layer = torch_side.layer(i)
                    t_next, t_grads = torch_side.backward(t_layer, t_hidden[i], t_in, i, t_ct_in, t_r)
                    del t_layer  # its gradients stay, for the comparisons below
                    f_layer = flax_side.layer(i)
                    f_next, f_grads = flax_side.backward(f_layer, f_hidden[i], f_in, i, f_ct_in, f_r)
                    prefix = f"model.layers.{i}."
                    _gradient_rows(gradients, t_grads, f_grads, g, prefix)
                    del f_grads
                    _, i_grads = flax_side.backward(f_layer, iso(t_hidden[i]), f_in, i, iso(t_ct_in), iso(t_r))
                    _gradient_rows(gradients, t_grads, i_grads, g, prefix, isolated=True)
                    del f_layer, t_grads, i_grads
                    t_ct_in, f_ct_in = t_next, f_next
                    bar.update()
                t_grads = torch_side.embedding_gradient(t_ct_in)
                _gradient_rows(gradients, t_grads, flax_side.embedding_gradient(f_ct_in, batch, f_tied_share), g)
                _gradient_rows(gradients, t_grads, flax_side.embedding_gradient(iso(t_ct_in), batch, i_tied_share),
                               g, isolated=True)
                del t_grads

    report = Report(title, dtype, head, meta={"describe": {"inputs": describe_batch(batch)}})
    if "forward" in sections:
        report.rows += forward
    if "head" in sections:
        report.rows += head_section
    report.rows += [gradients[name] for name in order if name in gradients]
    report.rows += kv_rows
    if "generation" in sections and head == "causal_lm":
        skipped = Comparison("greedy tokens", float("nan"), float("nan"), (), 0.0, False)
        report.rows.append(Row("generation", "tokens", skipped, note=GENERATION_SKIPPED, status="n/a"))
        # Recorded as not checked too: a PASS of this report says it is incomplete (verdict, JSON, HTML).
        report.skipped["generation"] = ("streamed check: greedy generation needs every layer per token; "
                                        "--no-stream runs it")
    report.skipped.update((s, "not requested") for s in SECTIONS if s not in sections)
    report.meta["timings"] = phases.timings()
    return report


class _NoBar:
    """Stands in for a progress bar inside a phase that counts layers, not tokens."""

    @staticmethod
    def update(n: int = 1) -> None:
        pass


def _gradient_rows(rows: dict[str, Row], t_grads: Mapping[str, Any], f_grads: Mapping[str, Any], tol: float,
                   prefix: str = "", isolated: bool = False) -> None:
    """Compare each torch gradient with the Flax one: a new row (chained), or the isolated figure
    of the row already there."""
    for rel, t_grad in t_grads.items():
        name = prefix + rel
        c = compare(name, t_grad, f_grads[rel], tol)
        if isolated:
            rows[name].isolated = c
        else:
            rows[name] = Row("gradients", "gradients", c, layer_of(name))
