"""The one precision policy, torch side (mirrors `flax_impl/layers/precision.py`).

1. Statistics in float32: norm statistics, rotary angles, softmax and losses are computed in
   `compute_dtype(dtype)` (float32, or float64 when the model runs in float64) and cast back to
   the activation dtype after. The casts are written at each op, identically in both twins.
2. Matrix products at full precision for the dtype they run in. torch has no per-op precision:
   its float32 matmul mode is process-wide (the TF32 switches). `matmul_precision(mode)` sets it
   for a block and restores what was there; parity runs pin "highest".

What a bare `model(x)` does on a GPU: torch's defaults, i.e. float32 matmuls in full float32
(cuBLAS TF32 is off by default since torch 1.12) unless your process turned TF32 on
(`torch.set_float32_matmul_precision("high")`, `torch.backends.cuda.matmul.allow_tf32 = True`,
or `fp32_precision = "tf32"`). To pin it: `with matmul_precision("highest"): model(x)`.
bfloat16, float16 and float64 matmuls are unaffected by these switches.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# The matmul modes of a parity run (`--matmul-precision`): full float32; TensorFloat-32
# (10-bit mantissa inputs, float32 accumulation; NVIDIA Ampere and later); bf16x3 (each float32
# input split into 3 bfloat16 products; XLA only: torch has no such matmul, its float32 stays full).
MATMUL_PRECISIONS = ("highest", "tf32", "bf16x3")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype for norm statistics, rotary angles, softmax and losses of activations in `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The dtype names of `weights.dtypes.FLOAT_DTYPES` (config.json, the CLI, the configs) -> torch.
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}


def to_dtype(name: str) -> torch.dtype:
    """A dtype name ("bfloat16", ...) -> the torch dtype."""
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype -> its name ("bfloat16", ...)."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"{dtype} is not one of the dtypes {', '.join(DTYPES)}")

# torch >= 2.9 has per-backend `fp32_precision` switches and refuses to mix them with the older
# `allow_tf32` ones, so each API is read and written on its own.
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")
_SWITCHES = {  # name in the report -> the object holding its `fp32_precision`
    "cuda.matmul": lambda: torch.backends.cuda.matmul,
    "cudnn.conv": lambda: torch.backends.cudnn.conv,
    "cudnn.rnn": lambda: torch.backends.cudnn.rnn,
    "mkldnn.matmul": lambda: torch.backends.mkldnn.matmul,
} if _NEW_API else {}


def _check_mode(mode: str) -> None:
    if mode not in MATMUL_PRECISIONS:
        raise ValueError(f"unknown matmul precision {mode!r}; one of {', '.join(MATMUL_PRECISIONS)}")


def _read() -> dict[str, str]:
    if _NEW_API:
        return {name: str(get().fp32_precision) for name, get in _SWITCHES.items()}
    return {"cuda.matmul.allow_tf32": str(torch.backends.cuda.matmul.allow_tf32),
            "cudnn.allow_tf32": str(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def matmul_settings() -> dict[str, str]:
    """torch's float32 matmul switches as they are now (what a report records). With the
    per-backend switches, "none" means "as `torch.backends.fp32_precision`", recorded too, whose
    own "none" means full float32."""
    if _NEW_API:  # (reading `get_float32_matmul_precision` would raise once backends differ)
        return {**_read(), "fp32_precision": str(torch.backends.fp32_precision)}
    return _read()


def _set(settings: dict[str, str]) -> None:
    if _NEW_API:
        for name, value in settings.items():
            _SWITCHES[name]().fp32_precision = value
        return
    # The global mode first: it rewrites allow_tf32, which is then set back explicitly.
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    torch.backends.cuda.matmul.allow_tf32 = settings["cuda.matmul.allow_tf32"] == "True"
    torch.backends.cudnn.allow_tf32 = settings["cudnn.allow_tf32"] == "True"


def _settings_for(mode: str) -> dict[str, str]:
    # GPU float32 products in TF32 only for "tf32". CPU (oneDNN) float32 matmuls stay full float32
    # in every mode: XLA's CPU backend has neither TF32 nor a bf16x3 that differs from float32.
    tf32 = mode == "tf32"
    if _NEW_API:
        gpu = "tf32" if tf32 else "ieee"
        return {"cuda.matmul": gpu, "cudnn.conv": gpu, "cudnn.rnn": gpu, "mkldnn.matmul": "ieee"}
    return {"cuda.matmul.allow_tf32": str(tf32), "cudnn.allow_tf32": str(tf32),
            "float32_matmul_precision": "high" if tf32 else "highest"}


@contextlib.contextmanager
def matmul_precision(mode: str = "highest") -> Iterator[dict[str, str]]:
    """Run the block with torch's float32 matmuls in `mode` (one of `MATMUL_PRECISIONS`), then
    restore every switch as it was, even on error. Yields the settings in force."""
    _check_mode(mode)
    saved = _read()
    _set(_settings_for(mode))
    try:
        yield matmul_settings()
    finally:
        _set(saved)
