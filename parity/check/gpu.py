"""`make gpu-check`: both twins on the GPU, every family and head, float32 and bfloat16.

Builds the demo checkpoints (every family; LLaMA with every head), runs `twinlm check` on each
in float32 (matmuls pinned to full float32, tolerance 1e-5) and in bfloat16, with the torch twin
on CUDA and the Flax twin on JAX's GPU backend, then the tests marked `gpu`, and prints one
summary table. Exit status 0 when every check and test passes.

On a machine without a GPU it says so and runs the same table on the CPU (a smoke test of the
script, not a GPU measurement); `--require-gpu` makes that an error (exit status 3) instead.
Budget: under 4 minutes on one GPU (159 s measured on one H100). Each check compiles its own
programs (most of its time, on the CPU), so 4 checks run at once in separate processes
(`--jobs`), JAX's preallocation off.

    python -m parity.check.gpu [--out DIR] [--require-gpu] [--dtypes float32,bfloat16] [--jobs N]
                               [--matmul-precisions highest,tf32,bf16x3] [--no-pytest] [--skip PART]

`--matmul-precisions` adds float32 checks with reduced matmuls (`float32@tf32`, `float32@bf16x3`),
each against its own row of the tolerance table: the run that measures those rows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..environment import MATMUL_PRECISIONS
from ..report import SECTIONS
from ..tolerances import QUANTITIES, row_name

BUDGET_S = 240.0


@dataclass
class Line:
    """One row of the summary table."""

    model: str
    head: str
    dtype: str  # the tolerance row: a dtype, or "float32@tf32" for reduced float32 matmuls
    devices: str
    worst: dict[str, float | None]  # None: no row of that quantity
    passed: bool
    seconds: float


def gpu_available() -> tuple[bool, str]:
    """(True, what) when torch sees a CUDA device and JAX has a gpu backend; else (False, why)."""
    import jax
    import torch

    reasons = []
    if not torch.cuda.is_available():
        reasons.append(f"torch {torch.__version__} sees no CUDA device (built with CUDA {torch.version.cuda or 'none'})")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
        reasons.append(f"JAX (jaxlib {jax.lib.__version__}) has no gpu backend")
    if reasons:
        return False, "; ".join(reasons)
    return True, f"torch cuda:0 ({torch.cuda.get_device_name(0)}), JAX {gpus[0].platform}:{gpus[0].id} ({gpus[0].device_kind})"


def check_one(directory: Path, name: str, head: str, dtype: str, on_gpu: bool, sections: tuple[str, ...],
              out_dir: Path, matmul_precision: str = "highest") -> Line:
    """One `twinlm check` of one checkpoint in one dtype and float32 matmul mode, summarised as a
    table line (the report is written next to the checkpoints when a row fails)."""
    import jax

    from .pair import check_checkpoint

    jax.config.update("jax_enable_x64", True)  # as the CLI: float64 inputs need it; float32 runs are unchanged
    device, platform = ("cuda", "gpu") if on_gpu else ("cpu", "cpu")
    start = time.perf_counter()
    report = check_checkpoint(directory, dtype, device=device, jax_platform=platform,
                              matmul_precision=matmul_precision, sections=sections)
    row = row_name(dtype, None, matmul_precision)
    # None: no row of that quantity (a section skipped, or not part of this check): shown as "-", not 0.
    worst = {q: max((r.comparison.rel for r in report.rows if r.quantity == q), default=None) for q in QUANTITIES}
    devices = report.meta["describe"]["run on"].split(";")[0]
    if not report.passed:
        report.write_json(out_dir / f"{name}-{row.replace('@', '-')}.json")
    return Line(name, head, row, devices, worst, report.passed, time.perf_counter() - start)


def run_checks(out_dir: Path, dtypes: tuple[str, ...], on_gpu: bool, sections: tuple[str, ...], jobs: int = 1,
               echo=print, matmul_precisions: tuple[str, ...] = ("highest",)) -> list[Line]:
    """Build every demo checkpoint under `out_dir`, then check each in every dtype (float32 once
    per mode of `matmul_precisions`), `jobs` checks at a time (separate processes: most of a
    check's time is XLA compiling, on the CPU)."""
    from ..demo import DEMO_MODELS, build_checkpoint

    tasks = []
    for model in DEMO_MODELS:
        directory = out_dir / model.name
        if not (directory / "config.json").exists():
            build_checkpoint(model, directory)
        tasks += [(directory, model.name, model.head, dtype, on_gpu, sections, out_dir, mode) for dtype in dtypes
                  for mode in (matmul_precisions if dtype == "float32" else ("highest",))]
    if jobs <= 1:
        lines = []
        for task in tasks:
            lines.append(check_one(*task))
            echo(f"  {lines[-1].model} {lines[-1].dtype}: {'pass' if lines[-1].passed else 'FAIL'} "
                 f"({lines[-1].seconds:.1f} s)")
        return lines
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(check_one, *task) for task in tasks]
        lines = []
        for future in futures:
            lines.append(future.result())
            echo(f"  {lines[-1].model} {lines[-1].dtype}: {'pass' if lines[-1].passed else 'FAIL'} "
                 f"({lines[-1].seconds:.1f} s)")
    return lines


def run_gpu_tests(on_gpu: bool) -> tuple[int, str]:
    """`pytest -m gpu`: (exit status, its summary line)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    # Exit status 5 is "no test collected" (every test deselected); skips count as passing.
    return (0 if proc.returncode in (0, 5) else proc.returncode), summary


def format_table(lines: list[Line]) -> str:
    """The summary: one row per (model, dtype), the worst relative error per quantity."""
    header = ("model", "head", "dtype", "devices") + QUANTITIES + ("status", "s")
    cell = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    rows = [(ln.model, ln.head, ln.dtype, ln.devices) + tuple(cell(ln.worst[q]) for q in QUANTITIES)
            + ("pass" if ln.passed else "FAIL", f"{ln.seconds:.1f}") for ln in lines]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.check.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    parser.add_argument("--matmul-precisions", default="highest",
                        help="float32 matmul modes, comma-separated, each checked against its own tolerance "
                             "row (default highest; e.g. highest,tf32,bf16x3 measures the reduced rows)")
    parser.add_argument("--require-gpu", action="store_true", help="exit 3 instead of falling back to the CPU")
    parser.add_argument("--no-pytest", action="store_true", help="leave out the tests marked gpu")
    parser.add_argument("--jobs", type=int, default=None,
                        help="checks run at once, in separate processes (default: 4 on a GPU, 1 on the CPU)")
    parser.add_argument("--skip", action="append", default=[], choices=["gradients", "kv-cache", "generation"],
                        help="leave out a part of each check (repeatable; the full check is the default)")
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.matmul_precisions.split(",") if m)
    if not set(modes) <= set(MATMUL_PRECISIONS):
        parser.error(f"--matmul-precisions: {args.matmul_precisions!r}; each one of {', '.join(MATMUL_PRECISIONS)}")

    # Before JAX starts: several processes share the GPU, so none may grab 75% of its memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    jax.config.update("jax_enable_x64", True)  # as the CLI: float64 inputs need it; float32 runs are unchanged
    start = time.perf_counter()
    on_gpu, what = gpu_available()
    if on_gpu:
        print(f"gpu-check on {what}")
    elif args.require_gpu:
        print(f"gpu-check: no GPU: {what}", file=sys.stderr)
        return 3
    else:
        print(f"gpu-check: NO GPU ({what}): running the same checks on the CPU. These are CPU figures; "
              f"the GPU rows are unmeasured.")
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    with tempfile.TemporaryDirectory(prefix="twinlm-gpu-check-") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        skipped = {name.replace("-", " ") for name in args.skip}
        jobs = args.jobs or (4 if on_gpu else 1)
        lines = run_checks(out, dtypes, on_gpu, tuple(s for s in SECTIONS if s not in skipped), jobs,
                           matmul_precisions=modes)
    status, summary = (0, "not run (--no-pytest)") if args.no_pytest else run_gpu_tests(on_gpu)
    elapsed = time.perf_counter() - start
    print()
    print(format_table(lines))
    print(f"\npytest -m gpu: {summary}")
    failed = [f"{ln.model} {ln.dtype}" for ln in lines if not ln.passed]
    over = on_gpu and elapsed > BUDGET_S  # the 4-minute budget is a GPU's
    print(f"{'GPU' if on_gpu else 'CPU fallback'}: {len(lines) - len(failed)}/{len(lines)} checks pass, "
          f"{elapsed:.0f} s{' (over the 4-minute budget)' if over else ''}")
    if not on_gpu:  # said again under the table, which is what gets copied into a note
        print(f"NO GPU ({what}): the figures above are the CPU's. Not measured by this run: every GPU row "
              f"(torch on CUDA, Flax on JAX's GPU), the float32@tf32 and float32@bf16x3 tolerance rows, the "
              f"4-minute budget and the host RSS of loading onto a GPU.")
    return 1 if failed or status != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
