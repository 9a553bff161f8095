"""The parity report: every measured difference, and its text and JSON renderings (the HTML one
is `parity.explain.report_html.write_html`).

A `Report` is a list of `Row`s in reading order: per layer (embeddings, then each layer's
attention weights and output), then the head's outputs and loss, then gradients (one row per
parameter; the text table summarises them per group), then KV-cache decoding and generation.
The first failing row in that order is where the twins first part ways.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compare import Comparison

__all__ = ["Report", "Row", "SECTIONS", "format_figure", "parameter_group"]

SECTIONS = ("forward", "head", "gradients", "kv cache", "generation")


@dataclass
class Row:
    """One measured tensor (or one check that could not run, with `status` "n/a")."""

    section: str  # one of SECTIONS
    quantity: str  # activations / logits / loss / gradients / tokens: picks the tolerance
    comparison: Comparison
    layer: int | None = None  # the decoder layer the tensor belongs to, when it has one
    note: str = ""
    status: str = ""  # "pass" / "fail" / "n/a"; derived from the comparison when empty

    def __post_init__(self) -> None:
        if not self.status:
            self.status = "pass" if self.comparison.passed else "fail"

    @property
    def name(self) -> str:
        """The tensor's name (HF parameter name for gradients)."""
        return self.comparison.name

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (non-finite numbers as strings, since JSON has none)."""
        d = {"section": self.section, "quantity": self.quantity, "layer": self.layer,
             "status": self.status, "note": self.note, **self.comparison.as_dict()}
        d["worst_index"] = list(d["worst_index"])
        d["shape"] = list(d["shape"])
        return {k: (_json_number(v) if isinstance(v, float) else v) for k, v in d.items()}


def _json_number(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def format_figure(x: float) -> str:
    """A figure as the table prints it: `0`, `3.1e-07`, `inf`."""
    if x == 0:
        return "0"
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def parameter_group(hf_name: str) -> str:
    """A parameter's group in the gradient summary: its decoder layer, or its top module
    (`model.layers.3.mlp.up_proj.weight` -> `model.layers.3`, `lm_head.weight` -> `lm_head`)."""
    m = re.match(r"^(.*?layers\.\d+)\.", hf_name)
    return m.group(1) if m else hf_name.rsplit(".", 1)[0]


@dataclass
class Report:
    """All rows of one check, with what was checked (the header of every rendering)."""

    title: str
    dtype: str
    head: str
    rows: list[Row] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # inputs, versions, paths, notes

    @property
    def passed(self) -> bool:
        """True when no row failed (rows that could not run, "n/a", do not fail the check)."""
        return all(r.status != "fail" for r in self.rows)

    def failures(self) -> list[Row]:
        """Failing rows in reading order."""
        return [r for r in self.rows if r.status == "fail"]

    def first_failure(self) -> Row | None:
        """Where the twins first part ways (reading order), or None."""
        fails = self.failures()
        return fails[0] if fails else None

    def worst(self, section: str | None = None, quantity: str | None = None) -> Row | None:
        """The row with the largest error relative to its tolerance, optionally within a
        section and/or quantity (generated tokens, counted not measured, only when asked for)."""
        rows = [r for r in self.rows if r.status != "n/a" and (section is None or r.section == section)
                and (r.quantity == quantity if quantity is not None else r.quantity != "tokens")]
        return max(rows, key=lambda r: _ratio(r.comparison), default=None)

    # ---- text ---------------------------------------------------------------------------
    def summary_rows(self) -> list[Row]:
        """Rows as the table shows them: gradients folded into one row per parameter group,
        which keeps the group's worst tensor (named in the note)."""
        order: list[Row | str] = []
        groups: dict[str, list[Row]] = {}
        for r in self.rows:
            if r.section != "gradients":
                order.append(r)
                continue
            key = parameter_group(r.name)
            if key not in groups:
                groups[key] = []
                order.append(key)  # the group's row goes where its first member was
            groups[key].append(r)
        return [_group_row(x, groups[x]) if isinstance(x, str) else x for x in order]

    def format_table(self) -> str:
        """The readable table `twinlm check` prints."""
        lines = [f"== {self.title} ==", f"dtype {self.dtype}, head {self.head}"]
        lines += [f"{k}: {v}" for k, v in self.meta.get("describe", {}).items()]
        header = ("tensor", "shape", "max abs", "rel err", "worst at", "tol", "status", "")
        current = None
        table: list[tuple[str, ...]] = []
        for r in self.summary_rows():
            if r.section != current:
                current = r.section
                table.append(("", "", "", "", "", "", "", ""))
                table.append((f"[{r.section}]", "", "", "", "", "", "", ""))
            c = r.comparison
            shape = "x".join(map(str, c.shape)) if c.shape else "-"
            at = ",".join(map(str, c.worst_index)) if c.worst_index else "-"
            figures = (format_figure(c.max_abs), format_figure(c.rel), at, f"{c.tolerance:.0e}") \
                if r.status != "n/a" else ("-", "-", "-", "-")
            table.append((c.name, shape) + figures + (r.status.upper() if r.status == "fail" else r.status, r.note))
        widths = [max(len(row[i]) for row in [header] + table) for i in range(len(header))]
        fmt = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
        lines.append(fmt(header))
        lines += [fmt(row) for row in table]
        n_fail = len(self.failures())
        n_na = sum(r.status == "n/a" for r in self.rows)
        verdict = "PASS" if self.passed else f"FAIL: {n_fail} of {len(self.rows)} tensors out of tolerance"
        first = self.first_failure()
        if first is not None:
            verdict += f"; first divergence: {first.name}"
        if n_na:
            verdict += f" ({n_na} check(s) not available)"
        lines.append("")
        lines.append(verdict)
        return "\n".join(lines)

    # ---- JSON ---------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        """Every figure, machine-readably."""
        first = self.first_failure()
        return {"title": self.title, "dtype": self.dtype, "head": self.head, "passed": self.passed,
                "first_failure": first.name if first else None,
                "meta": self.meta, "rows": [r.as_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """The inverse of `as_dict` (e.g. to re-render a report read from `--json` output)."""
        num = lambda v: float(v) if isinstance(v, str) else v  # "inf" / "nan" back to floats
        rows = [Row(r["section"], r["quantity"],
                    Comparison(r["name"], num(r["max_abs"]), num(r["rel"]), tuple(r["worst_index"]),
                               num(r["tolerance"]), r["passed"], tuple(r["shape"])),
                    r["layer"], r["note"], r["status"]) for r in d["rows"]]
        return cls(d["title"], d["dtype"], d["head"], rows, d.get("meta", {}))

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write `as_dict()` to `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1, default=str) + "\n", encoding="utf-8")
        return path


def _group_row(group: str, members: list[Row]) -> Row:
    worst = max(members, key=lambda m: _ratio(m.comparison))
    c = worst.comparison
    status = "fail" if any(m.status == "fail" for m in members) else "pass"
    summary = Comparison(group, c.max_abs, c.rel, c.worst_index, c.tolerance, status == "pass", c.shape)
    note = f"{len(members)} tensors, worst {worst.name[len(group) + 1:] or worst.name}"
    return Row("gradients", "gradients", summary, worst.layer, note=note, status=status)


def _ratio(c: Comparison) -> float:
    if c.tolerance > 0:
        return c.rel / c.tolerance
    return 0.0 if c.rel == 0 else math.inf
