"""`twinlm record` / `twinlm compare`: reference outputs for CI regression checks.

`record` runs one twin on the seeded check inputs and writes a safetensors file holding the
inputs (`input.*`), the outputs (`output.*`: head outputs, every hidden state, the loss, all in
float64 so no bit of a lower dtype is lost) and, in its metadata, what produced them: the
framework, dtype, head, seed, shapes and the versions of torch, jax, flax, numpy and twinlm.
`compare` reruns the same inputs (read back from the file, not regenerated) and reports every
difference against the tolerance table, or against `--rtol/--atol` (elementwise, as
`numpy.allclose`). A reference recorded with one framework can be compared with the other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .compare import compare, compare_allclose, to_numpy
from .environment import (MATMUL_PRECISIONS, current_environment, jax_device, run_environment, torch_device,
                          versions)
from .inputs import HEADS, Batch, check_run_size, seeded_batch
from .loading import DTYPES, BadInputError, detect_head, load_flax, load_torch, read_config
from .paths import check_output_file
from .report import Report, Row
from .tolerances import TOLERANCES, row_name, tolerance

__all__ = ["FORMAT", "compare_reference", "display_name", "fingerprint", "record", "run_twin",
           "validate_reference", "versions"]

FORMAT = "twinlm-reference/1"
FRAMEWORKS = ("torch", "flax")


def run_twin(model: Any, framework: str, inputs: dict[str, np.ndarray], head: str) -> dict[str, np.ndarray]:
    """One twin's outputs as float64 numpy arrays: head outputs, every hidden state, the loss.

    `inputs` holds `input_ids`, `attention_mask`, optionally `position_ids`, and the head's
    loss arguments (`labels`, or `start_positions` and `end_positions`), as numpy arrays.
    """
    if framework == "torch":
        import torch

        device = next(model.parameters()).device
        conv = lambda a: torch.from_numpy(np.array(a, order="C")).to(device)  # noqa: E731
    else:
        import jax.numpy as jnp

        conv = jnp.asarray
    args = (conv(inputs["input_ids"]), conv(inputs["attention_mask"]),
            conv(inputs["position_ids"]) if "position_ids" in inputs else None)
    labels = {k: conv(v) for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
    if framework == "torch":
        with torch.no_grad():
            out = model(*args, **labels, output_hidden_states=True)
    else:
        from .check import flax_forward  # compiled, as users run the Flax twin

        out = flax_forward(model, args, labels)
    names = ("start_logits", "end_logits") if head == "question_answering" else ("logits",)
    result = {n: to_numpy(getattr(out, n)) for n in names}
    for i, h in enumerate(out.hidden_states):
        result[f"hidden_states.{i}"] = to_numpy(h)
    result["loss"] = to_numpy(out.loss)
    return result


def _load(directory: str | os.PathLike, framework: str, dtype: str, head: str | None,
          allow_nonfinite: bool = False, param_dtype: str | None = None, device: Any = None,
          jax_device_: Any = None, matmul_precision: str = "highest") -> Any:
    if framework not in FRAMEWORKS:
        raise BadInputError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype or dtype)):
        if value not in DTYPES:
            raise BadInputError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
    if framework == "torch":
        return load_torch(directory, dtype, head, param_dtype=param_dtype, device=device,
                          allow_nonfinite=allow_nonfinite)
    return load_flax(directory, dtype, head, param_dtype=param_dtype, device=jax_device_, precision=matmul_precision,
                     allow_nonfinite=allow_nonfinite)


def fingerprint(directory: str | os.PathLike) -> str:
    """A short digest of a checkpoint: its config.json, every tensor's name, dtype and shape, and
    16 samples of 256 bytes spread over each tensor's data. Milliseconds at any size; equal for
    the same checkpoint wherever it lies, different for a fine-tuned or re-initialised one."""
    from weights.checkpoint import CheckpointReader
    from weights.hf_config import CONFIG_NAME

    h = hashlib.sha256((Path(directory) / CONFIG_NAME).read_bytes())
    with CheckpointReader(directory) as reader:
        for name in sorted(reader.keys()):
            f, key = reader.raw(name)
            info = f.info(key)
            h.update(f"{name}|{info.dtype}|{list(info.shape)}|".encode())
            n = info.nbytes
            for i in range(16 if n else 0):
                start = info.start + (n - min(n, 256)) * i // 15
                h.update(os.pread(f.fileno(), min(n, 256), start))
    return h.hexdigest()[:16]


def _devices(device: str | None, jax_platform: str | None) -> tuple[Any, Any]:
    try:
        return torch_device(device), jax_device(jax_platform)
    except ValueError as e:
        raise BadInputError(str(e)) from None


def record(directory: str | os.PathLike, out_path: str | os.PathLike, *, framework: str = "torch",
           dtype: str = "float32", seq_len: int = 16, batch_size: int = 3, seed: int = 0,
           force: bool = False, allow_nonfinite_weights: bool = False, param_dtype: str | None = None,
           device: str | None = None, jax_platform: str | None = None, matmul_precision: str = "highest") -> Path:
    """Write the reference file of `directory` run by `framework` to `out_path`: activations in
    `dtype`, parameters in `param_dtype` (default: `dtype`), on `device` (torch) or
    `jax_platform` (Flax), matmuls in `matmul_precision`; all of it, with the devices and
    library versions, goes into the file's metadata. An existing `out_path` is replaced only
    with `force`; it is checked before the model is loaded, and so are the batch shape and the
    config (`BadInputError`).
    """
    from weights import save_file

    check_output_file(out_path, "reference file", overwrite=force, outside=directory)
    config = read_config(directory)
    try:
        check_run_size(config, batch_size, seq_len, dtype, twins=1)
        batch = seeded_batch(config, batch_size, seq_len, seed)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    t_device, j_device = _devices(device, jax_platform)
    with run_environment(matmul_precision, t_device, j_device) as run:
        model = _load(directory, framework, dtype, None, allow_nonfinite_weights, param_dtype, t_device, j_device,
                      matmul_precision)
        head = detect_head(config, [n for n, _ in _named_params(model, framework)])
        inputs = _batch_arrays(batch, head)
        outputs = run_twin(model, framework, inputs, head)
        environment = current_environment(*((model, None) if framework == "torch" else (None, model)))
    tensors = {f"input.{k}": v for k, v in inputs.items()}
    tensors.update({f"output.{k}": np.array(v, order="C") for k, v in outputs.items()})
    meta = {"format": FORMAT, "framework": framework, "dtype": dtype, "param_dtype": param_dtype or dtype,
            "matmul_precision": run["mode"], "device": environment["devices"][framework], "head": head,
            "seed": str(seed), "seq_len": str(seq_len), "batch": str(batch_size), "checkpoint": str(directory),
            "fingerprint": fingerprint(directory),
            "padding": ",".join(batch.padding), "versions": json.dumps(versions(), sort_keys=True),
            "environment": json.dumps(environment, sort_keys=True)}
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        return save_file(tensors, out_path, meta)
    except OSError as e:
        raise BadInputError(f"cannot write {out_path}: {e.strerror or e}") from None


def _named_params(model: Any, framework: str) -> list[tuple[str, Any]]:
    if framework == "torch":
        return list(model.named_parameters())
    from flax import nnx

    from weights.names import hf_name

    return [(hf_name(p), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def _batch_arrays(batch: Batch, head: str) -> dict[str, np.ndarray]:
    arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.position_ids is not None:
        arrays["position_ids"] = batch.position_ids
    arrays.update(batch.head_labels(head))
    return {k: np.array(v, order="C") for k, v in arrays.items()}


def _read_reference(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from weights.errors import LOAD_ERRORS
    from weights import SafetensorsFile
    from weights.shapes import check_memory

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: reference file not found")
    try:
        check_memory(path.stat().st_size, "reading the reference file", source=path)
        with SafetensorsFile(path) as f:
            tensors = {k: np.array(f.get(k)) for k in f.keys()}
            meta = dict(f.metadata or {})
    except LOAD_ERRORS + (OSError,) as e:
        raise BadInputError(" ".join(str(e).split())) from None
    if meta.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a twinlm reference file (metadata format is "
                            f"{_short(meta.get('format'))}, expected {FORMAT!r}); write one with `twinlm record`")
    return tensors, meta


def validate_reference(directory: str | os.PathLike, ref_path: str | os.PathLike,
                       framework: str | None = None) -> None:
    """Refuse a reference file that `compare_reference(directory, ref_path)` could not use, without
    loading a model (`BadInputError` naming the file and the field)."""
    tensors, meta = _read_reference(ref_path)
    _validate_reference(ref_path, tensors, meta, read_config(directory), framework)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What a reference may hold, checked before a model sees any of it: inputs by name, with their
# kind ("i" integer, "f" float or integer) and rank (None: any); outputs by name.
_INPUT_KINDS = {"input_ids": ("i", 2), "attention_mask": ("i", 2), "position_ids": ("i", 2),
                "labels": ("f", None), "start_positions": ("i", 1), "end_positions": ("i", 1)}
# The loss arguments each head takes.
_HEAD_LABELS = {"causal_lm": ("labels",), "sequence_classification": ("labels",),
                "question_answering": ("start_positions", "end_positions")}


def _validate_reference(path: Any, tensors: dict[str, np.ndarray], meta: dict[str, str], config: Any,
                        framework: str | None) -> tuple[str, str, str, dict[str, np.ndarray], dict[str, Any]]:
    """(framework, dtype, head, inputs, recorded versions) of a reference read from `path`, after
    checking every field against what `compare` will do with it; `BadInputError` naming the
    field otherwise."""
    bad = lambda what: BadInputError(f"{path}: {what}")  # noqa: E731
    framework = framework or meta.get("framework", "torch")
    if framework not in FRAMEWORKS:
        raise bad(f"recorded framework {_short(framework)} is not one of {', '.join(FRAMEWORKS)}")
    dtype, head = meta.get("dtype", "float32"), meta.get("head")
    if dtype not in DTYPES:
        raise bad(f"recorded dtype {_short(dtype)} is not one of {', '.join(DTYPES)}")
    if head not in HEADS:
        raise bad(f"recorded head {_short(head)} is not one of {', '.join(HEADS)}")
    try:
        recorded = json.loads(meta.get("versions", "{}"))
    except (ValueError, RecursionError):
        recorded = None
    if not isinstance(recorded, dict):
        raise bad("metadata 'versions' is not a JSON object of library versions")
    inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
    unknown = sorted(set(inputs) - set(_INPUT_KINDS))
    if unknown or not {"input_ids", "attention_mask"} <= set(inputs):
        raise bad(f"inputs must hold input_ids and attention_mask, and only {', '.join(_INPUT_KINDS)}; "
                  f"found {', '.join(sorted(inputs)) or 'none'}")
    for name, a in inputs.items():
        kind, rank = _INPUT_KINDS[name]
        ok_kind = a.dtype.kind in "iu" or (kind == "f" and a.dtype.kind == "f")
        if not ok_kind or (rank is not None and a.ndim != rank):
            raise bad(f"input {name} must be {'integer' if kind == 'i' else 'numeric'}"
                      f"{f' of rank {rank}' if rank else ''}, found {a.dtype} {list(a.shape)}")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.shape != mask.shape or ids.size == 0 or any(a.shape[0] != ids.shape[0] for a in inputs.values()
                                                        if a.ndim):
        raise bad(f"inputs disagree in shape: input_ids {list(ids.shape)}, attention_mask {list(mask.shape)}")
    if "position_ids" in inputs and inputs["position_ids"].shape != ids.shape:
        raise bad(f"position_ids {list(inputs['position_ids'].shape)} differ from input_ids {list(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
        raise bad(f"input_ids hold token ids outside the vocabulary [0, {config.vocab_size})")
    if not np.isin(mask, (0, 1)).all():
        raise bad("attention_mask holds values other than 0 and 1")
    b, t = ids.shape
    labels = {k for k in inputs if k not in ("input_ids", "attention_mask", "position_ids")}
    if labels != set(_HEAD_LABELS[head]):
        raise bad(f"a {head} reference holds the loss inputs {', '.join(_HEAD_LABELS[head])}; "
                  f"found {', '.join(sorted(labels)) or 'none'}")
    if head == "causal_lm":
        lab = inputs["labels"]
        if lab.dtype.kind not in "iu" or lab.shape != (b, t) or not np.all((lab == -100) | ((lab >= 0) & (lab < config.vocab_size))):
            raise bad(f"labels must be token ids (or -100) of shape {[b, t]}, found {lab.dtype} {list(lab.shape)}")
    elif head == "question_answering":
        for k in ("start_positions", "end_positions"):
            if inputs[k].shape != (b,) or int(inputs[k].min()) < 0 or int(inputs[k].max()) >= t:
                raise bad(f"{k} must be {b} positions in [0, {t})")
    else:
        from .inputs import problem_type

        lab, kind = inputs["labels"], problem_type(config)
        want = (b,) if kind == "single_label_classification" or (kind == "regression" and config.num_labels == 1) \
            else (b, config.num_labels)
        if lab.shape != want or (kind == "single_label_classification" and (
                lab.dtype.kind not in "iu" or int(lab.min()) < 0 or int(lab.max()) >= config.num_labels)):
            raise bad(f"labels of a {kind} head must be of shape {list(want)}"
                      + (f" with classes in [0, {config.num_labels})" if kind == "single_label_classification" else "")
                      + f", found {lab.dtype} {list(lab.shape)}")
        if lab.dtype.kind == "f" and not np.isfinite(lab).all():
            raise bad("labels hold NaN or infinite values")
    try:
        check_run_size(config, ids.shape[0], ids.shape[1], dtype, twins=1)
    except ValueError as e:
        raise bad(str(e).replace("--batch", "batch").replace("--seq-len", "sequence length")) from None
    n_hidden = config.num_hidden_layers + 1
    for key in tensors:
        if key.startswith("output."):
            name = key[len("output."):]
            if not (name in _HEAD_OUTPUTS or name == "loss" or _hidden_index(name, n_hidden) is not None):
                raise bad(f"unknown recorded output {_short(name)}")
            if tensors[key].dtype.kind not in "fiu":
                raise bad(f"output {_short(name)} is not numeric ({tensors[key].dtype})")
        elif not key.startswith("input."):
            raise bad(f"tensor {_short(key)} is neither an input nor an output")
    if "position_ids" in inputs and np.abs(inputs["position_ids"].astype(np.float64)).max() >= 2 ** 31:
        raise bad("position_ids hold positions beyond 2**31")
    # Integer inputs as the int64 both twins index with (a uint8 mask or an int16 id is still valid).
    return framework, dtype, head, {k: np.ascontiguousarray(v, np.int64 if v.dtype.kind in "iu" else v.dtype)
                                    for k, v in inputs.items()}, recorded


def _hidden_index(name: str, n_hidden: int) -> int | None:
    """N of `hidden_states.N` when 0 <= N < n_hidden, else None."""
    prefix = "hidden_states."
    tail = name[len(prefix):] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() and len(tail) < 6 and int(tail) < n_hidden else None


def display_name(name: str, n_layers: int) -> str:
    """A recorded output under the name `twinlm check` gives the same tensor
    (`hidden_states.0` -> `model.embed_tokens (embeddings)`, `hidden_states.2` ->
    `model.layers.1 (output)`, the last -> `model.layers.{L-1} + model.norm (output)`)."""
    i = _hidden_index(name, n_layers + 1)
    if i is None:
        return name
    if i == 0:
        return "model.embed_tokens (embeddings)"
    return f"model.layers.{i - 1}" + (" + model.norm" if i == n_layers else "") + " (output)"


_HEAD_OUTPUTS = ("logits", "start_logits", "end_logits")


def _reading_order(name: str) -> tuple[int, int]:
    # Hidden states by layer, then the head's outputs, then the loss (the file sorts by name).
    if name.startswith("hidden_states."):
        return (0, int(name.split(".")[1]))
    if name in _HEAD_OUTPUTS:
        return (1, _HEAD_OUTPUTS.index(name))
    return (2, 0)


def compare_reference(directory: str | os.PathLike, ref_path: str | os.PathLike, *,
                      framework: str | None = None, rtol: float | None = None,
                      atol: float | None = None, allow_nonfinite_weights: bool = False,
                      param_dtype: str | None = None, device: str | None = None, jax_platform: str | None = None,
                      matmul_precision: str | None = None) -> Report:
    """Rerun the reference's inputs on `directory` and compare every recorded output. The dtypes
    and matmul precision default to the recorded ones; `device` / `jax_platform` say where to
    rerun (default: the CPU / JAX's default).

    Rows carry `twinlm check`'s names (`model.layers.N (output)`, ...). A reference recorded from
    a different checkpoint (its fingerprint differs) is compared all the same, with a warning in
    the report (`meta["warnings"]`), since that is often the point of a regression check.
    """
    for name, v in (("--rtol", rtol), ("--atol", atol)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise BadInputError(f"{name} must be a non-negative finite number, got {v}")
    tensors, meta = _read_reference(ref_path)
    config = read_config(directory)
    framework, dtype, head, inputs, recorded = _validate_reference(ref_path, tensors, meta, config, framework)
    warnings = []
    if meta.get("fingerprint") and meta["fingerprint"] != fingerprint(directory):
        warnings.append(f"the reference was recorded from a different checkpoint ({meta.get('checkpoint')}, "
                        f"fingerprint {meta['fingerprint']}; {directory} is {fingerprint(directory)})")
    elif not meta.get("fingerprint") and meta.get("checkpoint") and \
            Path(meta["checkpoint"]).resolve() != Path(directory).resolve():
        warnings.append(f"the reference was recorded from {meta['checkpoint']}, not {directory} "
                        "(no fingerprint recorded: re-record to compare contents)")
    param_dtype = param_dtype or meta.get("param_dtype", dtype)
    matmul_precision = matmul_precision or meta.get("matmul_precision", "highest")
    if matmul_precision not in MATMUL_PRECISIONS:
        raise BadInputError(f"{ref_path}: matmul precision {matmul_precision[:40]!r} is not one of "
                            f"{', '.join(MATMUL_PRECISIONS)}")
    row = row_name(dtype, param_dtype, matmul_precision)
    if row not in TOLERANCES and rtol is None and atol is None:
        raise BadInputError(f"no tolerance row for {row!r}; rows: {', '.join(TOLERANCES)} (or pass --rtol/--atol)")
    t_device, j_device = _devices(device, jax_platform)
    with run_environment(matmul_precision, t_device, j_device):
        model = _load(directory, framework, dtype, head, allow_nonfinite_weights, param_dtype, t_device, j_device,
                      matmul_precision)
        try:
            got = run_twin(model, framework, inputs, head)
        except (KeyError, ValueError, TypeError) as e:
            raise BadInputError(f"{ref_path}: the reference does not fit {directory}: {str(e)[:200]}") from None
        environment = current_environment(*((model, None) if framework == "torch" else (None, model)))
    environment["matmul_precision"]["mode"] = matmul_precision
    report = Report(f"{directory} vs {ref_path}", row, head)
    now = versions()
    changed = {k: f"{recorded.get(k)} -> {now.get(k)}" for k in now if recorded.get(k) != now.get(k)}
    describe = {"reference": f"recorded by the {meta.get('framework')} twin, compared with the {framework} twin",
                "versions changed": ", ".join(f"{k} {v}" for k, v in changed.items()) or "none",
                "bound": "tolerance table" if rtol is None and atol is None else
                         f"|got - ref| <= {atol or 0.0:g} + {rtol or 0.0:g} * |ref| elementwise"}
    if warnings:
        describe["WARNING"] = "; ".join(warnings)
    report.meta = {"reference": str(ref_path), "recorded_with": meta, "versions_now": now,
                   "environment": environment, "warnings": warnings, "describe": describe}
    n_layers = config.num_hidden_layers
    for name in sorted((k[len("output."):] for k in tensors if k.startswith("output.")), key=_reading_order):
        ref = tensors["output." + name]
        quantity = "loss" if name == "loss" else ("activations" if name.startswith("hidden_states") else "logits")
        layer = int(name.split(".")[1]) - 1 if name.startswith("hidden_states.") else None
        shown = display_name(name, n_layers)
        if name not in got:
            c = compare(shown, ref, np.full(ref.shape, np.nan), 0.0)
        elif rtol is None and atol is None:
            c = compare(shown, ref, got[name], tolerance(row, quantity))
        else:
            c = compare_allclose(shown, ref, got[name], rtol or 0.0, atol or 0.0)
        section = "forward" if name.startswith("hidden_states") else "head"
        note = "" if name not in got or got[name].shape == ref.shape else \
            f"shape changed: recorded {list(ref.shape)}, now {list(got[name].shape)}"
        note = note if name in got else "no longer produced"
        report.rows.append(Row(section, quantity, c, layer=None if layer is None or layer < 0 else layer, note=note))
    return report
