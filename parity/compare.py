"""Measuring the difference between two arrays: the unit every parity check reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from weights.blockcopy import row_blocks


def to_numpy(x: Any) -> np.ndarray:
    """A float64 (or integer) numpy copy of a torch tensor, jax array or numpy array."""
    if hasattr(x, "detach"):  # torch, without importing it here
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    a = np.asarray(x)
    # kind "V" is ml_dtypes' bfloat16, which numpy does not count as floating.
    return a.astype(np.float64) if a.dtype.kind in "fV" else a


@dataclass
class Comparison:
    """How far `got` is from `reference`: the figures a parity table shows for one tensor."""

    name: str
    max_abs: float  # max |got - reference|
    rel: float  # max_abs / max(1, max |reference|): what the tolerance bounds
    worst_index: tuple[int, ...]  # where max_abs occurs
    tolerance: float
    passed: bool
    shape: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return asdict(self)


def native(x: Any) -> np.ndarray:
    """A numpy view of a torch tensor, jax array or numpy array in its own dtype, copying nothing
    that is already in host memory (torch bfloat16 through an int16 view, as `ml_dtypes.bfloat16`)."""
    if hasattr(x, "detach"):  # torch, without importing it here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes
            import torch

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def compare(name: str, reference: Any, got: Any, tol: float, scale: float | None = None) -> Comparison:
    """Compare two arrays of the same shape against `tol * max(1, max|reference|)`.

    `scale`, when given, replaces `max|reference|` as the magnitude the error is relative to
    (still at least 1): for a value squashed by a contraction (a soft cap), errors keep the
    scale of what went in, not of what came out. NaN anywhere in either array (where the other
    is not NaN at the same place) fails.

    The arrays are read in their own dtypes and compared in float64 one block of rows at a time
    (`weights.blockcopy.row_blocks`, which also un-transposes a kernel's gradient tile by tile),
    so a gigabyte gradient costs a few megabytes of temporaries; the figures are those of one
    float64 pass over the whole arrays (max and first argmax do not depend on the blocking).
    """
    ref, out = native(reference), native(got)
    if ref.shape != out.shape:
        return Comparison(name, float("inf"), float("inf"), (), tol, False, tuple(ref.shape))
    if ref.size == 0:
        return Comparison(name, 0.0, 0.0, (), tol, True, tuple(ref.shape))
    max_abs, flat, ref_max, offset = -1.0, 0, 0.0, 0
    # Both iterators cut the same rows: a block's row count depends on the shape and float64 only.
    for r, o in zip(row_blocks(ref, np.float64), row_blocks(out, np.float64)):
        r, o = r.reshape(-1), o.reshape(-1)
        with np.errstate(invalid="ignore"):  # inf - inf is NaN, counted as inf below
            diff = np.subtract(r, o)
        np.abs(diff, out=diff)
        nan = np.isnan(diff)
        if nan.any():  # NaN where both are NaN is agreement; anywhere else a failure
            diff[nan] = np.where(np.isnan(r[nan]) & np.isnan(o[nan]), 0.0, np.inf)
        i = int(np.argmax(diff))
        if diff[i] > max_abs:  # strictly: the first occurrence in C order wins, as one argmax
            max_abs, flat = float(diff[i]), offset + i
        r = np.abs(r)  # not in place: a float64 block may be a view of the caller's array
        largest = float(r.max())
        if not np.isfinite(largest):  # an inf or NaN in the reference: the finite values' max
            finite = r[np.isfinite(r)]
            largest = float(finite.max()) if finite.size else 0.0
        ref_max = max(ref_max, largest)
        offset += r.size
    if scale is None:
        scale = ref_max
    rel = max_abs / max(1.0, scale)
    return Comparison(name, max_abs, rel, tuple(int(i) for i in np.unravel_index(flat, ref.shape)), tol,
                      bool(rel <= tol), tuple(ref.shape))


def compare_allclose(name: str, reference: Any, got: Any, rtol: float, atol: float) -> Comparison:
    """Compare elementwise as `numpy.allclose(got, reference, rtol, atol)` does:
    `|got - reference| <= atol + rtol * |reference|` everywhere (NaN only where both are NaN).

    `max_abs` and `rel` are reported as in `compare`; `worst_index` is the element that is
    furthest beyond (or closest to) its own bound; `tolerance` holds `rtol`.
    """
    ref, out = to_numpy(reference), to_numpy(got)
    if ref.shape != out.shape:
        return Comparison(name, float("inf"), float("inf"), (), rtol, False, tuple(ref.shape))
    if ref.size == 0:
        return Comparison(name, 0.0, 0.0, (), rtol, True, tuple(ref.shape))
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    diff = np.abs(ref64 - out64)
    both_nan = np.isnan(ref64) & np.isnan(out64)
    diff = np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
    bound = atol + rtol * np.abs(np.where(np.isnan(ref64), 0.0, ref64))
    excess = diff - bound
    flat = int(np.argmax(excess))
    finite = np.abs(ref64[np.isfinite(ref64)])
    scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    max_abs = float(diff.max())
    return Comparison(name, max_abs, max_abs / scale, tuple(int(i) for i in np.unravel_index(flat, ref.shape)),
                      rtol, bool(np.all(excess <= 0)), tuple(ref.shape))
