"""`make bench`: measured figures, printed as one aligned table.

A benchmark is a *section*: a function returning table rows, registered with `@section(name)`.
`python -m parity.bench` runs them all, `python -m parity.bench convert` only the named ones.

This module is the registry only (`Row`, `section`, `SECTIONS`, `print_table`, and the helpers
the sections share); it imports no section. Each section module registers itself when imported,
and `parity.bench.__main__` imports them all, in the order of the table:

- `checkpoints`: `convert`, `load` (the synthetic 1.1 B TinyLlama-shaped checkpoint; `--device cuda`:
  its host memory while loading onto the GPU);
- `check`: `check` (`twinlm check` streamed on that checkpoint), and, only when named, `check-whole`
  (the whole-model check of it) and `check7b` (a synthetic Llama-2-7B-shaped checkpoint);
- `generation`: `decode`, `forward` (a mid-size random LLaMA, one child process per twin);
- `side_by_side`: HF transformers against both twins in one process, interleaved (`--device cuda`:
  the 1.1 B bf16 GPU rows);
- `training`: `train` (`train_step` of the mid-size LLaMA, with and without remat; dropout masks);
- `serve`: `serve` (continuous against static batching on a Poisson trace, the same model);
- `vq`: `vq` (Transformer-VQ against full attention at 1k / 4k / 16k tokens);
- `sharding`: `sharding` (per-process peak RSS of a sharded torch `from_pretrained`, mid-size LLaMA);
- `flax_compile`, only when named: the Flax twin's `generate()` compile time and decode speed, layers
  unrolled against scanned (`--device cuda`: the 1.1 B bf16 first call and tokens/s).

To add a section, write a function returning `list[Row]` in one of these modules (or a new one
listed in `SECTION_MODULES`) and decorate it.

Each measurement that reports memory runs in a fresh child process, so its peak RSS
(`ru_maxrss`, which counts every page the process touched, file-backed ones included) is its
own and not the bench driver's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["ON_REQUEST", "Options", "Row", "SECTIONS", "SECTION_MODULES", "section", "options", "print_table",
           "cache_dir", "run_child", "best"]

ROOT = Path(__file__).resolve().parents[2]

# The section modules, in the order of the table (imported by `python -m parity.bench`).
SECTION_MODULES = ("parity.bench.checkpoints", "parity.bench.check", "parity.bench.generation",
                   "parity.bench.side_by_side", "parity.bench.training", "parity.bench.serve", "parity.bench.vq",
                   "parity.bench.sharding", "parity.bench.flax_compile")


@dataclass(frozen=True)
class Row:
    """One line of the table: what was measured, the figure, the goal, and whether it is met."""

    section: str
    case: str
    value: str
    goal: str = ""
    ok: bool | None = None  # None: informational, no goal


SECTIONS: dict[str, Callable[[], list[Row]]] = {}
# Sections that run only when named (`python -m parity.bench check7b`): too big for every run.
ON_REQUEST: set[str] = set()


@dataclass
class Options:
    """Command-line settings the sections read (`python -m parity.bench --device cuda ...`)."""

    device: str = "cpu"  # "cpu" or "cuda": where the sections that support a device run


_OPTIONS = Options()


def options() -> Options:
    """The settings of this bench run (defaults when run from Python)."""
    return _OPTIONS


def section(name: str, default: bool = True) -> Callable[[Callable[[], list[Row]]], Callable[[], list[Row]]]:
    """Register a benchmark section under `name` (the order of registration is the table's);
    with `default=False` it runs only when named."""

    def register(fn: Callable[[], list[Row]]) -> Callable[[], list[Row]]:
        SECTIONS[name] = fn
        if not default:
            ON_REQUEST.add(name)
        return fn

    return register


def print_table(rows: list[Row], file=sys.stdout) -> None:
    """Print rows as an aligned table."""
    header = ("section", "case", "measured", "goal", "")
    cells = [header] + [(r.section, r.case, r.value, r.goal, {True: "ok", False: "MISSED", None: ""}[r.ok])
                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for n, c in enumerate(cells):
        print("  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip(), file=file)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=file)


def cache_dir() -> Path:
    """Where generated benchmark inputs live: outside the repo, kept between runs."""
    base = os.environ.get("TWINLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "twinlm")
    return Path(base) / "bench"


def run_child(code: str, env: dict[str, str] | None = None, what: str = "benchmark child") -> dict:
    """Run Python `code` in a fresh interpreter at the repo root (environment `env`, default this
    process's); its last stdout line is JSON. A failure names `what` and quotes the child's stderr."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best(fn: Callable[[], object], repeat: int) -> float:
    """The shortest wall time of `repeat` calls (the one least disturbed by other processes)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
