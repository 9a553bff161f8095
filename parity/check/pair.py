"""`twinlm check`: run one model in both twins on the same inputs and measure every difference.

The torch twin is the reference: each error is `max|flax - torch|`, relative to
`max(floor, max|torch|)`, against the tolerance of its dtype and quantity (`parity/tolerances.py`).
Checked, in reading order: every hidden state and every layer's attention weights, the head's
outputs and loss, the gradient of every parameter (torch autograd vs `nnx.value_and_grad` of
the same loss, matched by HF name, kernels transposed), KV-cache decoding (one token at a
time) against the full forward pass in each twin and across twins, and greedy generation.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from jax.sharding import Mesh

import flax_impl
import torch_impl
from flax_impl.layers import attention as flax_attention
from torch_impl.layers import attention as torch_attention
from torch_impl.layers.precision import dtype_name
from weights.names import hf_name, is_transposed

from ..compare import Comparison, compare, to_numpy
from ..environment import current_environment, jax_device, run_environment, torch_device
from ..inputs import HEADS, Batch, check_run_size, seeded_batch
from ..loading import DTYPES, BadInputError, inspect_checkpoint, load_twins, read_config
from ..report import SECTIONS, Report, Row
from ..tolerances import TOLERANCES, row_name
from .generation import generation_rows
from .progress import Phases
from .rows import (capped_logit_scale, describe_batch, head_rows, kv_cache_rows, layer_of, to_jax, to_torch,
                   tolerance_for)

__all__ = ["check_checkpoint", "check_pair", "flax_forward", "to_jax", "to_torch"]

_GENERATED = 8  # new tokens of the generation section


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _head_of(model: Any) -> str:
    # By the head class in the MRO: FSDP2 (`fully_shard`) makes a subclass, FSDPForCausalLM.
    for klass in type(model).__mro__:
        for head, cls in HEADS.items():
            if cls == klass.__name__:
                return head
    raise TypeError(f"expected one of {', '.join(HEADS.values())}, got {type(model).__name__}")


def check_pair(torch_model: torch.nn.Module, flax_model: nnx.Module, batch: Batch, *,
               dtype: str | None = None, sections: Iterable[str] = SECTIONS, title: str = "parity",
               tolerances: Mapping[str, float] | None = None, max_new_tokens: int = _GENERATED,
               progress: bool | None = None, phases: Phases | None = None) -> Report:
    """Compare two twins of the same head holding the same weights, on `batch`.

    `dtype` (a name) selects the tolerances; by default it is the torch model's. `sections`
    restricts the work (e.g. skip "gradients"); `tolerances` overrides bounds per quantity.
    `progress` shows a bar per phase on stderr (None: when stderr is a terminal); the wall time
    of each phase goes to `report.meta["timings"]` (`phases` continues an earlier timer).
    """
    sections = tuple(sections)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; one of {SECTIONS}")
    head = _head_of(torch_model)
    if _head_of(flax_model) != head:
        raise TypeError(f"the twins differ in head: {type(torch_model).__name__} vs {type(flax_model).__name__}")
    # The table row of the activation dtype (and of the parameters' when they differ).
    dtype = dtype or row_name(dtype_name(torch_model.model.dtype), dtype_name(next(torch_model.parameters()).dtype))
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("a float64 check needs JAX's 64-bit mode: call "
                           "jax.config.update('jax_enable_x64', True) before creating any array")
    config = torch_model.config
    tol = lambda quantity: tolerance_for(dtype, quantity, tolerances)
    report = Report(title, dtype, head)
    report.meta["describe"] = {"inputs": describe_batch(batch)}
    report.skipped.update((s, "not requested") for s in SECTIONS if s not in sections)
    report.meta["environment"] = current_environment(torch_model, flax_model)  # devices, precision, versions

    want_grads = "gradients" in sections
    phases = phases or Phases(progress)
    with phases("forward + backward" if want_grads else "forward", total=2, unit="twin") as bar:
        # The Flax twin first: its gradients are held while torch's backward pass compares each
        # torch gradient as soon as it is accumulated, then frees both. The two full sets never
        # coexist.
        f_out, f_grads = _flax_forward(flax_model, batch, head, want_grads)
        bar.update()
        t_out, grad_rows = _torch_forward(torch_model, batch, head, f_grads if want_grads else None,
                                          tol("gradients"))
        bar.update()
    capped = capped_logit_scale(torch_model, t_out, head)
    if "forward" in sections:
        report.rows += _forward_rows(t_out, f_out, tol)
        if any(a is None for a in t_out.attentions):
            report.skipped["attention weights"] = "fast attention: the fused kernels return no maps"
    # Every layer's attention map is compared: drop them before decoding and generation.
    t_out.attentions, f_out = None, f_out.replace(attentions=None)
    if "head" in sections:
        report.rows += head_rows(t_out, f_out, head, tol, capped)
    report.rows += grad_rows
    if "kv cache" in sections:
        with phases("kv cache", total=2 * batch.input_ids.shape[1], unit="token") as bar:
            report.rows += _kv_cache_rows(torch_model, flax_model, batch, head, t_out, f_out, tol, capped, bar)
    if "generation" in sections:
        with phases("generation"):
            scale = capped[0] if capped else max(1.0, float(np.abs(_logits(t_out, head)).max()))
            report.rows += generation_rows(torch_model, flax_model, batch, head, config,
                                           tol("logits"), max_new_tokens, scale)
    report.meta["timings"] = phases.timings()
    return report


def _logits(out: Any, head: str) -> np.ndarray:
    x = out.start_logits if head == "question_answering" else out.logits
    return to_numpy(x)


# ---- running each twin -------------------------------------------------------------------
def _torch_forward(model: torch.nn.Module, batch: Batch, head: str, flax_grads: dict | None,
                   tol: float) -> tuple[Any, list[Row]]:
    """The torch twin's forward pass; with `flax_grads` ({HF name: Flax gradient in HF layout})
    also its backward pass, each parameter's gradient compared with the Flax one the moment it is
    accumulated and then dropped (both sides), so no full set of torch gradients is ever held.
    Returns the outputs and the gradient rows in parameter order."""
    dev = _device(model)  # inputs follow the torch twin's device
    labels = {k: to_torch(v, dev) for k, v in batch.head_labels(head).items()}
    model.zero_grad(set_to_none=True)
    grads = flax_grads is not None
    rows: dict[str, Row] = {}

    def compare_and_free(name: str):
        def hook(param: torch.nn.Parameter) -> None:
            rows[name] = _gradient_row(name, param.grad, flax_grads, tol)
            param.grad = None
        return hook

    # A sharded twin (`twinlm check --mesh` under torchrun): FSDP2 sets its parameters' gradients
    # after its reduce-scatter, past the accumulation hooks; they are read, gathered, after backward.
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    hooks = [p.register_post_accumulate_grad_hook(compare_and_free(n)) for n, p in model.named_parameters()] \
        if grads and not sharded else []
    try:
        with torch.set_grad_enabled(grads):
            out = model(to_torch(batch.input_ids, dev), to_torch(batch.attention_mask, dev),
                        to_torch(batch.position_ids, dev), **labels, output_hidden_states=True, output_attentions=True)
            if grads:
                out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    if sharded:
        out.attentions = _whole_heads(model, out.attentions)
        for name, p in model.named_parameters() if grads else ():
            if p.grad is not None:  # every rank gathers every gradient, in the same order
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # whole norms under TP
                rows[name] = _gradient_row(name, grad, flax_grads, tol)
                p.grad = None
    if not grads:
        return out, []
    # A parameter the loss does not reach (an expert no token was routed to) has no torch gradient.
    ordered = [rows.pop(n) if n in rows else _gradient_row(n, torch.zeros(p.shape, dtype=p.dtype), flax_grads,
                                                           tol) for n, p in model.named_parameters()]
    for name in sorted(flax_grads):
        extra = Comparison(name, float("inf"), float("inf"), (), tol, False, tuple(flax_grads[name].shape))
        ordered.append(Row("gradients", "gradients", extra, layer_of(name), note="no torch parameter"))
    return out, ordered


def _whole_heads(model: torch.nn.Module, attentions: tuple | None) -> tuple | None:
    """Attention maps `[B, H, S, S]` of every head: under tensor parallelism each rank computed
    its own heads (contiguous, in rank order), gathered here over the `tensor` ranks."""
    from torch.distributed.tensor import DTensor, Shard

    heads = model.config.num_attention_heads
    if not attentions or attentions[0] is None or attentions[0].shape[1] == heads:
        return attentions
    weight = next(m.q_proj.weight for m in model.modules() if hasattr(m, "q_proj"))
    mesh = weight.device_mesh["tensor"] if len(weight.device_mesh.mesh_dim_names) > 1 else weight.device_mesh
    return tuple(DTensor.from_local(a.contiguous(), mesh, [Shard(1)], run_check=False).full_tensor()
                 for a in attentions)


def _gradient_row(name: str, t_grad: torch.Tensor, flax_grads: dict, tol: float) -> Row:
    """One parameter's gradient row; the Flax gradient is taken out of `flax_grads` (and freed)."""
    if name not in flax_grads:
        missing = Comparison(name, float("inf"), float("inf"), (), tol, False, tuple(t_grad.shape))
        return Row("gradients", "gradients", missing, layer_of(name), note="no Flax gradient")
    return Row("gradients", "gradients", compare(name, t_grad, flax_grads.pop(name), tol), layer_of(name))


def _flax_forward(model: nnx.Module, batch: Batch, head: str, grads: bool) -> tuple[Any, dict]:
    labels = {k: to_jax(v) for k, v in batch.head_labels(head).items()}
    args = (to_jax(batch.input_ids), to_jax(batch.attention_mask), to_jax(batch.position_ids))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out, g = _flax_run(graphdef, params, rest, args, labels, grads)
    named = {}
    for path, var in nnx.to_flat_state(g) if grads else ():
        name = hf_name(path)
        value = np.asarray(var[...])  # a view of the device buffer on CPU, not a copy
        named[name] = value.T if is_transposed(name) else value
    return out, named


def flax_forward(model: nnx.Module, args: tuple, labels: dict) -> Any:
    """The Flax twin's compiled forward pass with every hidden state and attention map."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _flax_run(graphdef, params, rest, args, labels, False)[0]


# Compiled, as users run the Flax twin; one compilation per model structure, dtype and shape.
# `nnx.split` + `jax.jit`, not `nnx.jit`: `nnx.jit` hands the model's state back out of the
# compiled function, a fresh copy of every parameter per call.
@functools.partial(jax.jit, static_argnames=("graphdef", "grads"))
def _flax_run(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, args: tuple, labels: dict,
              grads: bool) -> tuple[Any, Any]:
    def run(p: nnx.State) -> tuple[jax.Array, Any]:
        out = nnx.merge(graphdef, p, rest)(*args, **labels, output_hidden_states=True, output_attentions=True)
        return out.loss, out

    if not grads:
        return run(params)[1], None
    (_, out), g = jax.value_and_grad(run, has_aux=True)(params)
    return out, g


# ---- rows ----------------------------------------------------------------------------------
def _forward_rows(t_out: Any, f_out: Any, tol: Any) -> list[Row]:
    """Embeddings, then per layer: attention weights and the layer's output. The last hidden
    state is HF's: the last layer's output after the final norm."""
    a, n = tol("activations"), len(t_out.attentions)
    rows = [Row("forward", "activations", compare("model.embed_tokens (embeddings)",
                                                  t_out.hidden_states[0], f_out.hidden_states[0], a))]
    for i in range(n):
        if t_out.attentions[i] is not None or f_out.attentions[i] is not None:  # fused kernels return none
            rows.append(Row("forward", "activations", compare(f"model.layers.{i}.self_attn (attention weights)",
                                                              t_out.attentions[i], f_out.attentions[i], a), layer=i))
        name = f"model.layers.{i} (output)" if i < n - 1 else f"model.layers.{i} + model.norm (output)"
        rows.append(Row("forward", "activations", compare(name, t_out.hidden_states[i + 1],
                                                          f_out.hidden_states[i + 1], a), layer=i))
    return rows


def _kv_cache_rows(torch_model: Any, flax_model: Any, batch: Batch, head: str, t_out: Any, f_out: Any,
                   tol: Any, capped: tuple[float, str] | None, bar: Any = None) -> list[Row]:
    """Feed the sequence one token at a time into a static cache; the result must equal the full
    forward pass at every real token (prompt prefill through the cache is exercised by the
    generation check, whose `generate()` prefills then decodes). The causal LM is checked on
    logits, the other heads (which pool or score every token) on the decoder's last hidden state.
    """
    t = batch.input_ids.shape[1]
    causal = head == "causal_lm"
    t_model = torch_model if causal else torch_model.model
    f_model = flax_model if causal else flax_model.model
    pick = (lambda o: o.logits) if causal else (lambda o: o.last_hidden_state)
    config = torch_model.config
    dtype = torch_model.model.dtype  # the cache holds activations

    with torch.no_grad():
        dev = _device(torch_model)
        # Sharded (under torchrun): each rank caches its kv heads; FSDP2 parameters gathered for
        # the calls below the root (the heads' decoder).
        cache = torch_impl.KVCache.init(config, batch.input_ids.shape[0], t, dtype=dtype, device=dev,
                                        num_key_value_heads=torch_impl.sharding.local_kv_heads(torch_model))
        with torch_impl.sharding.gathered_for_generation(torch_model):
            t_cached = torch.cat(list(_decode(t_model, batch, cache, lambda a: to_torch(a, dev), pick, bar)), dim=1)
    cache = flax_impl.KVCache.init(config, batch.input_ids.shape[0], t, dtype=flax_model.model.dtype)
    f_cached = jnp.concatenate(list(_decode(_FlaxStep(f_model), batch, cache, to_jax, pick, bar)), axis=1)
    return kv_cache_rows(batch, head, t_out, f_out, t_cached, f_cached, tol, capped)


class _FlaxStep:
    """Calls a Flax model's cached forward compiled (one compilation per shape), through
    `nnx.split` + `jax.jit` so that no step copies the parameters (see `_flax_run`)."""

    def __init__(self, model: nnx.Module):
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)

    def __call__(self, ids: jax.Array, mask: jax.Array, pos: jax.Array | None, *, past_key_values: Any,
                 use_cache: bool) -> Any:
        return _flax_cached_step(self.graphdef, self.params, self.rest, ids, mask, pos, past_key_values)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _flax_cached_step(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, ids: jax.Array,
                      mask: jax.Array, pos: jax.Array | None, cache: Any) -> Any:
    return nnx.merge(graphdef, params, rest)(ids, mask, pos, past_key_values=cache, use_cache=True)


def _decode(model: Any, batch: Batch, cache: Any, convert: Any, pick: Any, bar: Any = None):
    # The mask is passed at full cache width ([B, S], which both twins accept; the causal rule
    # hides the slots not written yet): every step has the same shapes, so the Flax twin
    # compiles its step once, not once per position.
    ids, mask, pos = batch.input_ids, convert(batch.attention_mask), batch.position_ids
    for i in range(ids.shape[1]):
        out = model(convert(ids[:, i:i + 1]), mask, None if pos is None else convert(pos[:, i:i + 1]),
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        if bar is not None:
            bar.update()
        yield pick(out)


# ---- from a checkpoint directory ---------------------------------------------------------
def check_checkpoint(directory: str | os.PathLike, dtype: str = "float32", *, seq_len: int = 16,
                     batch_size: int = 3, seed: int = 0, head: str | None = None,
                     flax_directory: str | os.PathLike | None = None,
                     sections: Iterable[str] = SECTIONS,
                     tolerances: Mapping[str, float] | None = None, param_dtype: str | None = None,
                     device: str | None = None, jax_platform: str | None = None,
                     matmul_precision: str = "highest", stream: bool | None = None,
                     memory_budget: int | None = None, progress: bool | None = None,
                     announce: Callable[[str], None] | None = None,
                     allow_nonfinite_weights: bool = False, mesh: Mapping[str, int] | None = None,
                     attn_implementation: str = "eager") -> Report:
    """Load `directory` into both twins and run `check_pair` on `seeded_batch`, or stream it layer
    by layer (`check_streamed`) when the whole-model check would not fit: activations in `dtype`,
    parameters in `param_dtype` (default: `dtype`), the torch twin on `device` ("cpu", "cuda",
    "cuda:N"), the Flax twin on the first device of `jax_platform` ("cpu", "gpu", "tpu"; default:
    JAX's default), matmuls of both in `matmul_precision` for the whole run. The tolerance row
    follows (`parity.tolerances.row_name`); the report records devices, precision settings and
    library versions under `meta["environment"]`. The streamed check runs on the CPU, parameters
    in `dtype`, matmuls `highest`: other settings need the whole-model check.
    With `mesh` ({axis: size}, e.g. {"data": 2, "tensor": 4}) the Flax twin runs sharded over a
    device mesh and is also compared with itself unsharded (`parity.check.sharded`); like the
    streamed check, it runs on the CPU with the default settings.
    `attn_implementation` "fast" runs both twins on their fused attention kernels
    (`set_attn_implementation`) instead of the eager reference: the check then holds the fast
    paths to each other, with the same tolerances, and has no attention maps to compare.

    `stream` forces the mode (None: choose). The choice compares the whole-model check's
    estimated peak (`memory.whole_model_bytes`) with `memory_budget` bytes (default: a fraction
    of the memory available now); `announce`, when given, is called with the decision and its
    reason before anything is loaded. `progress` shows a bar per phase on stderr.
    Raises `BadInputError` for a checkpoint or argument that cannot be used, before either twin
    is built: a header that disagrees with the config, NaN or infinite weights (unless
    `allow_nonfinite_weights`), a batch the model or the machine cannot take
    (`parity.inputs.check_run_size`); with `stream=False`, two whole twins that do not fit.
    """
    from .memory import choose_mode, default_budget, model_sizes, whole_model_bytes
    from .streamed import check_streamed

    if batch_size < 2:
        raise BadInputError(f"--batch must be >= 2 (one left-padded and one right-padded row), got {batch_size}")
    if seq_len < 2:
        raise BadInputError(f"--seq-len must be >= 2 (a padded row keeps one real token), got {seq_len}")
    if dtype not in DTYPES:
        raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("a float64 check needs JAX's 64-bit mode: call "
                           "jax.config.update('jax_enable_x64', True) before creating any array")
    if attn_implementation not in ("eager", "fast"):
        raise BadInputError(f"attention implementation must be 'eager' or 'fast', got {attn_implementation!r}")
    row = row_name(dtype, param_dtype, matmul_precision)
    if row not in TOLERANCES and not tolerances:
        raise BadInputError(f"no tolerance row for {row!r} (dtype {dtype}, parameters {param_dtype or dtype}, "
                            f"matmuls {matmul_precision}); rows: {', '.join(TOLERANCES)}")
    try:
        t_device, j_device = torch_device(device), jax_device(jax_platform)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    sections = tuple(sections)
    try:
        check_run_size(read_config(directory), batch_size, seq_len, dtype,
                       new_tokens=_GENERATED if "generation" in sections else 0)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    # The header against the config and the NaN scan, once for both modes; the memory of two
    # whole twins only where they will be built whatever the estimate says (the mode choice
    # below weighs it otherwise).
    # (The parameters are what the memory holds: sized in the dtype they are stored in.)
    config, head = inspect_checkpoint(directory, param_dtype or dtype, head, twins=2 if stream is False else 0,
                                      allow_nonfinite=allow_nonfinite_weights)
    if flax_directory is not None:
        inspect_checkpoint(flax_directory, param_dtype or dtype, head, twins=0,
                           allow_nonfinite=allow_nonfinite_weights)
    batch = seeded_batch(config, batch_size, seq_len, seed)
    note = None
    if head == "sequence_classification" and config.pad_token_id is None:
        # Without a pad id the classifier cannot find each row's last token (HF allows batch 1 only).
        batch = seeded_batch(config, 1, seq_len, seed, paddings=("none",))
        note = "config has no pad_token_id: sequence classification runs one unpadded row (as HF)"
    # Parameters dominate the peak: sized in the dtype they are stored in.
    estimate = whole_model_bytes(config, head, param_dtype or dtype, gradients="gradients" in sections,
                                 batch=batch.input_ids.shape[0], seq_len=seq_len, sizes=model_sizes(config, head))
    budget, budget_note = (memory_budget, "--memory-budget") if memory_budget is not None else default_budget()
    if mesh is not None and stream:
        raise BadInputError("--mesh checks whole models (each twin sharded across devices): drop --stream")
    mode = choose_mode(estimate, budget, False if mesh is not None else stream, budget_note)
    off_default = [flag for flag, used in (("--param-dtype", param_dtype not in (None, dtype)),
                                           ("--device", t_device.type != "cpu"),
                                           ("--jax-platform", j_device.platform != "cpu"),
                                           ("--matmul-precision", matmul_precision != "highest"),
                                           ("--fast", attn_implementation != "eager")) if used]
    if mesh is not None and off_default:
        raise BadInputError(f"the sharded check (--mesh) runs on the CPU with parameters in --dtype and matmuls "
                            f"'highest'; {', '.join(off_default)} need the check without --mesh")
    if mode.streamed and off_default:
        raise BadInputError(f"the layer-streamed check ({mode.describe()}) runs on the CPU with parameters in "
                            f"--dtype and matmuls 'highest'; {', '.join(off_default)} need the whole-model check "
                            f"(--no-stream, with the memory it needs)")
    if announce is not None:
        announce(mode.describe() + (f"; Flax twin sharded over mesh {dict(mesh)}" if mesh is not None else ""))
    with run_environment(matmul_precision, t_device, j_device) as environment:
        if mesh is not None:
            report = check_sharded(directory, dtype, batch, mesh, head=head, sections=sections, title=f"{directory}",
                                   tolerances=tolerances, phases=Phases(progress))
        elif mode.streamed:
            report = check_streamed(directory, dtype, batch, config=config, head=head, flax_directory=flax_directory,
                                    sections=sections, title=f"{directory}", tolerances=tolerances,
                                    progress=progress)
            report.meta["environment"] = current_environment()
            report.meta["environment"]["devices"] = environment["devices"]
        else:
            phases = Phases(progress)
            with phases("load", total=1, unit="checkpoint") as bar:
                # Header, memory and NaN weights were checked above: not a second scan of every weight.
                twins = load_twins(directory, dtype, head, flax_directory, param_dtype=param_dtype, device=t_device,
                                   jax_device=j_device, precision=matmul_precision, allow_nonfinite=True)
                bar.update()
            torch_attention.set_attn_implementation(twins.torch_model, attn_implementation)
            flax_attention.set_attn_implementation(twins.flax_model, attn_implementation)
            report = check_pair(twins.torch_model, twins.flax_model, batch, dtype=row, sections=sections,
                                title=f"{directory}", tolerances=tolerances, phases=phases)
    report.meta["checkpoint"] = str(directory)
    if flax_directory is not None:
        report.meta["flax_checkpoint"] = str(flax_directory)
    report.meta["environment"]["matmul_precision"]["mode"] = environment["mode"]
    devices = report.meta["environment"]["devices"]
    report.meta["describe"] = {"inputs": describe_batch(batch), "model": _describe_config(config),
                               "mode": mode.describe(),
                               "run on": f"torch {devices['torch']}, flax {devices['flax']}; matmuls {matmul_precision}"
                                         f"; attention {attn_implementation}"}
    if note:
        report.meta["describe"]["note"] = note
    report.meta["mode"] = mode.as_dict()
    report.meta["seed"] = seed
    return report


def _describe_config(config: Any) -> str:
    kv = config.resolved_num_key_value_heads
    return (f"{config.model_type}, {config.num_hidden_layers} layers, width {config.hidden_size}, "
            f"{config.num_attention_heads} heads / {kv} kv heads, vocab {config.vocab_size}")


# ---- `twinlm check --mesh`: the Flax twin sharded over a device mesh ------------------------
# The rows are the unsharded check's (torch twin against the sharded Flax twin; under torchrun
# the torch twin sharded over the ranks too), plus each sharded twin against itself whole (logits
# and loss): sharding may only reorder sums. On CPU the devices are simulated (the CLI sets
# --xla_force_host_platform_device_count before JAX starts). The torch twin's sharded runs need
# several processes (torchrun, see the README); tests/twins/test_sharding.py holds them to one
# process in float64.

def device_mesh(axes: Mapping[str, int]) -> Mesh:
    """A `Mesh` of the first prod(sizes) devices, shaped and named as `axes` ({axis: size})."""
    count = math.prod(axes.values())
    devices = jax.devices()
    if len(devices) < count:
        raise BadInputError(f"--mesh {','.join(f'{a}={n}' for a, n in axes.items())} needs {count} devices; "
                            f"JAX sees {len(devices)} {devices[0].platform} device(s) (on CPU, set "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts)")
    return Mesh(np.asarray(devices[:count]).reshape(tuple(axes.values())), tuple(axes))


def torch_device_mesh(axes: Mapping[str, int]):
    """Under `torchrun` (WORLD_SIZE > 1): the process group (gloo, CPU) and a `DeviceMesh` shaped
    and named as `axes`; None in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    count = math.prod(axes.values())
    if count != world:
        raise BadInputError(f"--mesh {','.join(f'{a}={n}' for a, n in axes.items())} has {count} places; "
                            f"torchrun started {world} processes (--nproc-per-node): they must be equal")
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # env:// from torchrun; the sharded check runs on the CPU
    return init_device_mesh("cpu", tuple(axes.values()), mesh_dim_names=tuple(axes))


def _torch_sharded(directory: str | os.PathLike, dtype: str, head: str, mesh: Any) -> torch.nn.Module:
    """The torch twin loaded sharded over `mesh` (each rank reading its slices)."""
    try:
        return getattr(torch_impl, HEADS[head]).from_pretrained(directory, dtype=dtype, mesh=mesh)
    except ValueError as e:  # a dimension the mesh does not divide, a head count, a data axis without fsdp
        raise BadInputError(" ".join(str(e).split())) from None


def _torch_sharded_rows(batch: Batch, head: str, whole: torch.nn.Module, sharded: torch.nn.Module,
                        mesh: Any, tol: Callable[[str], float], names: tuple[str, ...]) -> list[Row]:
    """The torch twin sharded over `mesh` (every rank the whole batch) against itself whole."""
    kwargs = dict(input_ids=to_torch(batch.input_ids), attention_mask=to_torch(batch.attention_mask),
                  position_ids=to_torch(batch.position_ids),
                  **{k: to_torch(v) for k, v in batch.head_labels(head).items()})
    with torch.no_grad():
        one, many = whole(**kwargs), sharded(**kwargs)
    note = f"mesh {dict(zip(mesh.mesh_dim_names, mesh.mesh.shape))}: the torch twin sharded (torch.distributed, " \
           f"{mesh.size()} ranks) vs itself in one process"
    rows = [Row("head", "logits", compare(f"torch sharded vs unsharded ({n})", getattr(one, n), getattr(many, n),
                                          tol("logits")), note=note) for n in names]
    if one.loss is not None:
        rows.append(Row("head", "loss", compare("torch sharded vs unsharded (loss)", one.loss, many.loss, tol("loss")),
                        note=note))
    return rows


def check_sharded(directory: str | os.PathLike, dtype: str, batch: Batch, axes: Mapping[str, int], *,
                  head: str, sections: Iterable[str], title: str, tolerances: Mapping[str, float] | None = None,
                  phases: Phases | None = None) -> Report:
    """Both twins whole, the Flax twin also loaded sharded over `axes`; `check_pair` of torch
    against the sharded Flax twin, then the sharded Flax twin against the unsharded one. Under
    `torchrun` (as many processes as `axes` has places) the torch twin is sharded too, over a
    `DeviceMesh` of `axes` (every rank the whole batch): the pair rows compare the two sharded
    twins, and the sharded torch twin is also compared with itself whole.
    `report.meta["pair"]` names each side of the pair rows: its mesh, or "whole"."""
    mesh = device_mesh(axes)
    torch_mesh = torch_device_mesh(axes)
    phases = phases or Phases(None)
    with phases("load", total=2 if torch_mesh is None else 3, unit="model") as bar:
        twins = load_twins(directory, dtype, head, allow_nonfinite=True)  # checked by the caller
        bar.update()
        try:
            sharded = getattr(flax_impl, HEADS[head]).from_pretrained(directory, dtype=dtype, mesh=mesh)
        except ValueError as e:  # a dimension the mesh does not divide, named by the table
            raise BadInputError(" ".join(str(e).split())) from None
        bar.update()
        torch_sharded = None if torch_mesh is None else _torch_sharded(directory, dtype, head, torch_mesh)
        if torch_mesh is not None:
            bar.update()
    labels = {k: to_jax(v) for k, v in batch.head_labels(head).items()}
    args = (to_jax(batch.input_ids), to_jax(batch.attention_mask), to_jax(batch.position_ids))
    one = flax_forward(twins.flax_model, args, labels)
    with jax.set_mesh(mesh):
        pair_torch = twins.torch_model if torch_sharded is None else torch_sharded
        report = check_pair(pair_torch, sharded, batch, dtype=dtype, sections=sections, title=title,
                            tolerances=tolerances, phases=phases)
        many = flax_forward(sharded, args, labels)
    tol = lambda quantity: tolerance_for(dtype, quantity, tolerances)  # noqa: E731
    names = ("start_logits", "end_logits") if head == "question_answering" else ("logits",)
    note = f"mesh {dict(axes)}: the Flax twin sharded vs itself on one device"
    rows = [Row("head", "logits", compare(f"flax sharded vs unsharded ({n})", getattr(one, n), getattr(many, n),
                                          tol("logits")), note=note) for n in names]
    if one.loss is not None:
        rows.append(Row("head", "loss", compare("flax sharded vs unsharded (loss)", one.loss, many.loss, tol("loss")),
                        note=note))
    if torch_mesh is not None:
        rows += _torch_sharded_rows(batch, head, twins.torch_model, torch_sharded, torch_mesh, tol, names)
    # After the head rows, so the table shows one [head] section.
    heads = [i for i, r in enumerate(report.rows) if r.section == "head"]
    at = heads[-1] + 1 if heads else len(report.rows)
    report.rows[at:at] = rows
    report.meta["mesh"] = dict(axes)
    report.meta["pair"] = {"torch": "whole" if torch_mesh is None else dict(axes), "flax": dict(axes)}
    if torch_mesh is not None:
        report.meta["torch_ranks"] = torch_mesh.size()
    return report
