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

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from .compare import compare, compare_allclose, to_numpy
from .inputs import Batch, seeded_batch
from .loading import DTYPES, BadInputError, detect_head, load_flax, load_torch, read_config
from .report import Report, Row
from .tolerances import tolerance

__all__ = ["FORMAT", "compare_reference", "record", "run_twin", "versions"]

FORMAT = "twinlm-reference/1"
FRAMEWORKS = ("torch", "flax")


def versions() -> dict[str, str]:
    """Versions of what produces the numbers (python, numpy, torch, jax, jaxlib, flax, twinlm)."""
    out = {"python": platform.python_version()}
    for dist in ("numpy", "torch", "jax", "jaxlib", "flax", "twinlm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def run_twin(model: Any, framework: str, inputs: dict[str, np.ndarray], head: str) -> dict[str, np.ndarray]:
    """One twin's outputs as float64 numpy arrays: head outputs, every hidden state, the loss.

    `inputs` holds `input_ids`, `attention_mask`, optionally `position_ids`, and the head's
    loss arguments (`labels`, or `start_positions` and `end_positions`), as numpy arrays.
    """
    if framework == "torch":
        import torch

        conv = lambda a: torch.from_numpy(np.array(a, order="C"))
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


def _load(directory: str | os.PathLike, framework: str, dtype: str, head: str | None) -> Any:
    if framework not in FRAMEWORKS:
        raise BadInputError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    if dtype not in DTYPES:
        raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return (load_torch if framework == "torch" else load_flax)(directory, dtype, head)


def record(directory: str | os.PathLike, out_path: str | os.PathLike, *, framework: str = "torch",
           dtype: str = "float32", seq_len: int = 16, batch_size: int = 3, seed: int = 0) -> Path:
    """Write the reference file of `directory` run by `framework` in `dtype` to `out_path`."""
    from weights import save_file

    config = read_config(directory)
    model = _load(directory, framework, dtype, None)
    head = detect_head(config, [n for n, _ in _named_params(model, framework)])
    try:
        batch = seeded_batch(config, batch_size, seq_len, seed)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    inputs = _batch_arrays(batch, head)
    tensors = {f"input.{k}": v for k, v in inputs.items()}
    tensors.update({f"output.{k}": np.array(v, order="C") for k, v in run_twin(model, framework, inputs, head).items()})
    meta = {"format": FORMAT, "framework": framework, "dtype": dtype, "head": head, "seed": str(seed),
            "seq_len": str(seq_len), "batch": str(batch_size), "checkpoint": str(directory),
            "padding": ",".join(batch.padding), "versions": json.dumps(versions(), sort_keys=True)}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return save_file(tensors, out_path, meta)


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
    from weights.errors import CheckpointError
    from weights import SafetensorsFile

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: reference file not found")
    try:
        with SafetensorsFile(path) as f:
            tensors = {k: np.array(f.get(k)) for k in f.keys()}
            meta = dict(f.metadata or {})
    except (CheckpointError, OSError) as e:
        raise BadInputError(" ".join(str(e).split())) from None
    if meta.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a twinlm reference file (metadata format is "
                            f"{meta.get('format')!r}, expected {FORMAT!r}); write one with `twinlm record`")
    return tensors, meta


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
                      atol: float | None = None) -> Report:
    """Rerun the reference's inputs on `directory` and compare every recorded output."""
    tensors, meta = _read_reference(ref_path)
    framework = framework or meta.get("framework", "torch")
    dtype, head = meta.get("dtype", "float32"), meta.get("head")
    model = _load(directory, framework, dtype, head)
    inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
    try:
        got = run_twin(model, framework, inputs, head)
    except (KeyError, ValueError, TypeError) as e:
        raise BadInputError(f"{ref_path}: the reference does not fit {directory}: {e}") from None
    report = Report(f"{directory} vs {ref_path}", dtype, head)
    recorded = json.loads(meta.get("versions", "{}"))
    now = versions()
    changed = {k: f"{recorded.get(k)} -> {now.get(k)}" for k in now if recorded.get(k) != now.get(k)}
    report.meta = {"reference": str(ref_path), "recorded_with": meta, "versions_now": now,
                   "describe": {"reference": f"recorded by the {meta.get('framework')} twin, compared "
                                             f"with the {framework} twin",
                                "versions changed": ", ".join(f"{k} {v}" for k, v in changed.items()) or "none",
                                "bound": "tolerance table" if rtol is None and atol is None else
                                         f"|got - ref| <= {atol or 0.0:g} + {rtol or 0.0:g} * |ref| elementwise"}}
    for name in sorted((k[len("output."):] for k in tensors if k.startswith("output.")), key=_reading_order):
        ref = tensors["output." + name]
        quantity = "loss" if name == "loss" else ("activations" if name.startswith("hidden_states") else "logits")
        layer = int(name.split(".")[1]) - 1 if name.startswith("hidden_states.") else None
        if name not in got:
            c = compare(name, ref, np.full(ref.shape, np.nan), 0.0)
        elif rtol is None and atol is None:
            c = compare(name, ref, got[name], tolerance(dtype, quantity))
        else:
            c = compare_allclose(name, ref, got[name], rtol or 0.0, atol or 0.0)
        section = "forward" if name.startswith("hidden_states") else "head"
        note = "" if name not in got or got[name].shape == ref.shape else \
            f"shape changed: recorded {list(ref.shape)}, now {list(got[name].shape)}"
        note = note if name in got else "no longer produced"
        report.rows.append(Row(section, quantity, c, layer=None if layer is None or layer < 0 else layer, note=note))
    return report
