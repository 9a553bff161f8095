"""Measuring the difference between two arrays: the unit every parity check reports.

Non-finite values are failures, never agreement. A NaN or an infinity in one array where the
other holds a finite number fails the row (`nonfinite="one"`, error `inf`). NaN or infinity in
both arrays at the same place fails too, with its own verdict (`nonfinite="both"`): two twins
that both produce NaN agree on nothing, and a CI gate must not pass a corrupted checkpoint
because both frameworks propagate its NaN the same way. In that case the figures are those of
the elements where both are finite, and `worst_index` is the first non-finite element.
"""

from __future__ import annotations

import math
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
    rel: float  # max_abs / max(floor, max |reference|): what the tolerance bounds
    worst_index: tuple[int, ...]  # where max_abs occurs
    tolerance: float
    passed: bool
    shape: tuple[int, ...] = ()
    nonfinite: str = ""  # "" all finite; "one": NaN/inf in one array only; "both": in both at the same place
    floor: float = 1.0  # rel = max_abs / max(floor, scale): below `floor`, a tensor counts as that large

    @property
    def nonfinite_note(self) -> str:
        """What the non-finite values were, for the report's note column ("" when none)."""
        at = ",".join(map(str, self.worst_index)) or "-"
        if self.nonfinite == "one":
            return f"non-finite in one twin only (first at {at})"
        if self.nonfinite == "both":
            return f"both twins produced non-finite values (first at {at})"
        return ""

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


def _nonfinite(name: str, ref: np.ndarray, out: np.ndarray, tol: float) -> tuple[Comparison | None, np.ndarray]:
    """The verdict on non-finite values, and the mask of elements finite in both arrays.

    Returns a failing `Comparison` when one array is non-finite where the other is finite (the
    error is then infinite), else None and the mask (the caller measures the finite elements and
    marks the row "both" when the mask leaves anything out).
    """
    ref_bad, out_bad = ~np.isfinite(ref), ~np.isfinite(out)
    one_sided = ref_bad != out_bad
    if one_sided.any():
        flat = int(np.argmax(one_sided))
        at = tuple(int(i) for i in np.unravel_index(flat, ref.shape))
        return Comparison(name, float("inf"), float("inf"), at, tol, False, tuple(ref.shape), "one"), ref_bad
    return None, ref_bad


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return _unravel(int(np.argmax(mask)), mask.shape)


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def compare(name: str, reference: Any, got: Any, tol: float, scale: float | None = None,
            floor: float | None = None) -> Comparison:
    """Compare two arrays of the same shape: passes when `max|got - reference| <= tol * max(floor,
    max|reference|)`, i.e. the error is relative to the reference's scale, and a tensor smaller
    than `floor` is measured as if it were `floor` large (its values are then rounding noise of
    larger terms, where a relative bound means nothing).

    `floor` defaults to the tolerance's own (`tol.floor` for a bound from `parity.tolerances`:
    each dtype's floor is in the table, with its reason), else 1. `scale`, when given, replaces
    `max|reference|` as the magnitude the error is relative to (still at least `floor`): for a
    value squashed by a contraction (a soft cap), errors keep the scale of what went in, not of
    what came out. Non-finite values fail (see the module doc).

    The arrays are read in their own dtypes and compared in float64 one block of rows at a time
    (`weights.blockcopy.row_blocks`, which also un-transposes a kernel's gradient tile by tile),
    so a gigabyte gradient costs a few megabytes of temporaries; the figures are those of one
    float64 pass over the whole arrays (max and first argmax do not depend on the blocking).
    """
    floor = float(getattr(tol, "floor", 1.0) if floor is None else floor)
    tol = float(tol)
    ref, out = native(reference), native(got)
    if ref.shape != out.shape:
        return Comparison(name, float("inf"), float("inf"), (), tol, False, tuple(ref.shape), floor=floor)
    if ref.size == 0:
        return Comparison(name, 0.0, 0.0, (), tol, True, tuple(ref.shape), floor=floor)
    max_abs, flat, ref_max, offset, both_at = -1.0, 0, 0.0, 0, None
    # Both iterators cut the same rows: a block's row count depends on the shape and float64 only.
    for r, o in zip(row_blocks(ref, np.float64), row_blocks(out, np.float64)):
        r, o = r.reshape(-1), o.reshape(-1)
        r_bad, o_bad = ~np.isfinite(r), ~np.isfinite(o)
        if r_bad.any() or o_bad.any():
            one_sided = r_bad != o_bad
            if one_sided.any():  # blocks come in C order: this is the first one-sided element
                at = _unravel(offset + int(np.argmax(one_sided)), ref.shape)
                return Comparison(name, float("inf"), float("inf"), at, tol, False, tuple(ref.shape), "one", floor)
            if both_at is None:
                both_at = _unravel(offset + int(np.argmax(r_bad)), ref.shape)
        with np.errstate(invalid="ignore"):  # inf - inf where both are infinite: masked out below
            diff = np.subtract(r, o)
        np.abs(diff, out=diff)
        if r_bad.any():  # measured on the elements finite in both; the non-finite ones fail below
            diff[r_bad] = 0.0
        i = int(np.argmax(diff))
        if diff[i] > max_abs:  # strictly: the first occurrence in C order wins, as one argmax
            max_abs, flat = float(diff[i]), offset + i
        r = np.abs(r)  # not in place: a float64 block may be a view of the caller's array
        if r_bad.any():
            r = r[~r_bad]
        if r.size:
            ref_max = max(ref_max, float(r.max()))
        offset += o.size
    if scale is None:
        scale = ref_max
    denominator = max(floor, scale)
    rel = max_abs / denominator if denominator > 0 else (0.0 if max_abs == 0 else math.inf)
    if both_at is not None:
        return Comparison(name, max_abs, rel, both_at, tol, False, tuple(ref.shape), "both", floor)
    return Comparison(name, max_abs, rel, _unravel(flat, ref.shape), tol, bool(rel <= tol), tuple(ref.shape),
                      floor=floor)


def compare_allclose(name: str, reference: Any, got: Any, rtol: float, atol: float) -> Comparison:
    """Compare elementwise as `numpy.allclose(got, reference, rtol, atol)` does:
    `|got - reference| <= atol + rtol * |reference|` everywhere; non-finite values fail as in
    `compare`.

    `max_abs` and `rel` are reported as in `compare`; `worst_index` is the element that is
    furthest beyond (or closest to) its own bound; `tolerance` holds `rtol`.
    """
    ref, out = to_numpy(reference), to_numpy(got)
    if ref.shape != out.shape:
        return Comparison(name, float("inf"), float("inf"), (), rtol, False, tuple(ref.shape))
    if ref.size == 0:
        return Comparison(name, 0.0, 0.0, (), rtol, True, tuple(ref.shape))
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    failed, both_bad = _nonfinite(name, ref64, out64, rtol)
    if failed is not None:
        return failed
    with np.errstate(invalid="ignore"):
        diff = np.where(both_bad, 0.0, np.abs(ref64 - out64))
    bound = atol + rtol * np.abs(np.where(both_bad, 0.0, ref64))
    excess = diff - bound
    flat = int(np.argmax(excess))
    finite = np.abs(ref64[~both_bad])
    scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    max_abs = float(diff.max())
    if both_bad.any():
        return Comparison(name, max_abs, max_abs / scale, _first(both_bad), rtol, False, tuple(ref.shape), "both")
    return Comparison(name, max_abs, max_abs / scale, tuple(int(i) for i in np.unravel_index(flat, ref.shape)),
                      rtol, bool(np.all(excess <= 0)), tuple(ref.shape))
