"""`make bench`: measured figures, printed as one aligned table.

A benchmark is a *section*: a function returning table rows, registered with `@section(name)`.
`python -m parity.bench` runs them all, `python -m parity.bench convert` only the named ones.
To add one, write a function returning `list[Row]` and decorate it; nothing else changes.

Each measurement that reports memory runs in a fresh child process, so its peak RSS
(`ru_maxrss`, which counts every page the process touched, file-backed ones included) is its
own and not the bench driver's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["Row", "SECTIONS", "section", "print_table", "main", "cache_dir", "run_child"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One line of the table: what was measured, the figure, the goal, and whether it is met."""

    section: str
    case: str
    value: str
    goal: str = ""
    ok: bool | None = None  # None: informational, no goal


SECTIONS: dict[str, Callable[[], list[Row]]] = {}


def section(name: str) -> Callable[[Callable[[], list[Row]]], Callable[[], list[Row]]]:
    """Register a benchmark section under `name` (the order of registration is the table's)."""

    def register(fn: Callable[[], list[Row]]) -> Callable[[], list[Row]]:
        SECTIONS[name] = fn
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


def run_child(code: str) -> dict:
    """Run Python `code` in a fresh interpreter at the repo root; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- convert ---------------------------------------------------------------------------------
# TinyLlama-1.1B's shape, in bf16: about 2.2 GB, 201 tensors, the largest the 131 MB embedding.
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# The child's preamble: its peak RSS in bytes, and a wall clock. VmHWM, not ru_maxrss: Linux
# carries the parent's RSS at fork into the child's ru_maxrss across exec, VmHWM starts afresh.
_MEASURE = """
import json, os, resource, sys, time
def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def peak_rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""


def ensure_tinyllama(root: Path) -> Path:
    """Generate the synthetic bf16 TinyLlama-shaped checkpoint once; reuse it afterwards."""
    from weights.config import ModelConfig
    from weights.synthetic import write_synthetic_checkpoint

    import ml_dtypes

    path = root / "tinyllama-bf16"
    config = ModelConfig(**TINYLLAMA)
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        try:
            if ModelConfig.from_pretrained(path).replace(architectures=None, torch_dtype=None) == config:
                return path
        except Exception:  # noqa: BLE001 - a stale or broken cache is regenerated
            pass
    print(f"generating the synthetic 1.1 B-parameter checkpoint in {path} (once) ...", file=sys.stderr)
    write_synthetic_checkpoint(path, config, dtype=ml_dtypes.bfloat16, force=True)
    return path


def _copy_child(src: Path, dst: Path, fsync: bool) -> dict:
    return run_child(_MEASURE + f"""
import shutil
t0, c0 = time.perf_counter(), cpu_seconds()
shutil.copyfile({str(src)!r}, {str(dst)!r})
if {fsync}:
    fd = os.open({str(dst)!r}, os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({{"wall": time.perf_counter() - t0, "cpu": cpu_seconds() - c0, "rss": peak_rss()}}))
""")


def _convert_child(src: Path, dst: Path, layout: str, fsync: bool) -> dict:
    return run_child(_MEASURE + f"""
from weights.convert import convert
t0 = time.perf_counter()
c0 = cpu_seconds()
convert({str(src)!r}, {str(dst)!r}, layout={layout!r}, force=True, progress=False, fsync={fsync})
print(json.dumps({{"wall": time.perf_counter() - t0, "cpu": cpu_seconds() - c0, "rss": peak_rss()}}))
""")


def _baseline_child() -> dict:
    return run_child(_MEASURE + """
import weights.convert, tqdm.auto
print(json.dumps({"rss": peak_rss()}))
""")


def _drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()  # let the previous step's writeback finish before the next one is timed


def _ensure_flax_layout(src: Path) -> Path:
    """The same checkpoint in twinlm's Flax layout (made once by the converter)."""
    from weights.convert import convert

    path = src.with_name(src.name + "-flax")
    if not (path / "flax_model.safetensors").is_file():
        convert(src, path, layout="flax", force=True, progress=False)
    return path


def _repeats() -> int:
    return max(1, int(os.environ.get("TWINLM_BENCH_REPEAT", "2")))


@section("convert")
def bench_convert() -> list[Row]:
    """Converter wall time against a plain copy of the same bytes, and its peak RSS.

    Copies and conversions alternate, `TWINLM_BENCH_REPEAT` times each (default 2), and the
    best of each is compared: on a shared machine the minimum is the figure least disturbed by
    other work. Both are timed with and without the final fsync (durable vs page cache).
    """
    from weights.checkpoint import CheckpointReader

    root = cache_dir()
    src = ensure_tinyllama(root)
    flax_src = _ensure_flax_layout(src)
    weights_file = src / "model.safetensors"
    with CheckpointReader(src) as r:
        largest = max(r.nbytes(k) for k in r.keys())
        total = sum(r.nbytes(k) for k in r.keys())
        n = len(r.keys())
    for f in (weights_file, flax_src / "flax_model.safetensors"):
        with open(f, "rb") as fh:  # warm the page cache, so copies and conversions read alike
            while fh.read(64 << 20):
                pass
    scratch = root / "scratch"
    _drop(scratch)
    scratch.mkdir(parents=True)
    rss_goal = largest + 500 * 10**6
    base = _baseline_child()["rss"]
    rows = [Row("convert", f"input: synthetic TinyLlama bf16, {n} tensors, {total / 1e9:.2f} GB",
                f"largest tensor {largest / 1e6:.0f} MB"),
            Row("convert", "python + weights imports, peak RSS", f"{base / 1e6:.0f} MB")]
    cases = [("hf -> hf (re-shard 5GB)", "hf", src), ("hf -> flax layout", "flax", src),
             ("flax -> hf layout", "hf", flax_src)]
    for fsync in (True, False):
        tag = "fsync" if fsync else "no fsync"
        for label, layout, source in cases:
            copies, converts = [], []
            for _ in range(_repeats()):
                copies.append(_copy_child(weights_file, scratch / "copy.safetensors", fsync))
                _drop(scratch / "copy.safetensors")
                converts.append(_convert_child(source, scratch / "out", layout, fsync))
                _drop(scratch / "out")
            copy = min(c["wall"] for c in copies)
            conv = min(c["wall"] for c in converts)
            rss = max(c["rss"] for c in converts)
            ratio = conv / copy
            # CPU time (user + sys) beside wall time: on a busy machine it is the steadier figure.
            cpu = (min(c["cpu"] for c in converts), min(c["cpu"] for c in copies))
            rows.append(Row("convert", f"{label}: wall / copy ({tag})",
                            f"{ratio:.2f} ({conv:.1f} s vs {copy:.1f} s; CPU {cpu[0]:.1f} s vs {cpu[1]:.1f} s)",
                            "<= 1.5", ratio <= 1.5))
            rows.append(Row("convert", f"{label}: peak RSS ({tag})", f"{rss / 1e6:.0f} MB",
                            f"<= {rss_goal / 1e6:.0f} MB", rss <= rss_goal))
    _drop(scratch)
    return rows


def _load_child(twin: str, src: Path) -> dict:
    return run_child(_MEASURE + f"""
import {twin}
t0 = time.perf_counter()
model = {twin}.ForCausalLM.from_pretrained({str(src)!r})
wall = time.perf_counter() - t0
print(json.dumps({{"wall": wall, "rss": peak_rss()}}))
""")


def _import_child(twin: str) -> dict:
    return run_child(_MEASURE + f"""
import {twin}, weights.pretrained
print(json.dumps({{"rss": peak_rss()}}))
""")


@section("load")
def bench_load() -> list[Row]:
    """Peak RSS of `from_pretrained` on the 1.1 B bf16 checkpoint, in each twin."""
    from weights.checkpoint import CheckpointReader

    src = ensure_tinyllama(cache_dir())
    with CheckpointReader(src) as r:
        model_bytes = sum(r.nbytes(k) for k in r.keys())
    rows = []
    for twin, goal in (("flax_impl", 1.3), ("torch_impl", None)):
        base = _import_child(twin)["rss"]
        m = _load_child(twin, src)
        ratio = m["rss"] / model_bytes
        rows.append(Row("load", f"{twin}.ForCausalLM.from_pretrained: peak RSS / model bytes",
                        f"{ratio:.2f} ({m['rss'] / 1e9:.2f} GB; imports alone {base / 1e9:.2f} GB)",
                        f"<= {goal}" if goal else "", (ratio <= goal) if goal else None))
        rows.append(Row("load", f"{twin}.ForCausalLM.from_pretrained: wall", f"{m['wall']:.1f} s"))
    return rows


# ---- decode / forward (issue 6): measured by parity/bench_generation.py, one child per twin ----
DECODE_GOALS = {("flax", 1): 0.95, ("torch", 1): 0.70, ("flax", 8): 0.60, ("torch", 8): 0.40}


@section("decode")
def bench_decode() -> list[Row]:
    """Greedy decode (prompt 32, 64 new tokens) against the bandwidth bound: one step must read
    every weight matrix once. A step is (t(64 new) - t(1 new)) / 63, so the prefill is excluded."""
    from . import bench_generation as g

    results = [g.measure(twin) for twin in ("torch", "flax")]
    probes = {f"{r['twin']} {k}": v for r in results for k, v in r["bandwidth"].items()}
    bandwidth = max(probes.values())
    step_bytes = results[0]["step_bytes"]
    bound = step_bytes / bandwidth
    rows = [Row("decode", f"machine: {os.cpu_count()} CPUs, load average {results[0]['load']:.1f} / "
                          f"{results[1]['load']:.1f} after the torch / flax runs", ""),
            Row("decode", "read bandwidth, best of: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in probes.items()),
                f"{bandwidth / 1e9:.1f} GB/s: {step_bytes / 1e6:.0f} of {results[0]['param_bytes'] / 1e6:.0f} MB "
                f"read per step -> bound {bound * 1e3:.1f} ms/step")]
    for r in results:
        for d in r["decode"]:
            ratio = bound / d["step"]
            goal = DECODE_GOALS[(r["twin"], d["batch"])]
            threads = f", {r['threads']} threads" if "threads" in r else ""
            rows.append(Row("decode", f"{r['twin']} batch {d['batch']}{threads}",
                            f"{d['batch'] / d['step']:.1f} tok/s, {d['step'] * 1e3:.1f} ms/step = {ratio:.0%} of bound "
                            f"(end to end {d['batch'] * g.DECODE_NEW / d['full']:.1f} tok/s"
                            + (f"; compile {d['compile']:.1f} s)" if r["twin"] == "flax" else ")"),
                            f">= {goal:.0%}", ratio >= goal))
    return rows


@section("forward")
def bench_forward() -> list[Row]:
    """Forward latency (logits of every position) against FLOPs / the framework's own float32
    matmul rate (2048^3, best of the probes before and after the runs)."""
    from . import bench_generation as g

    rows = []
    for twin in ("torch", "flax"):
        r = g.measure(twin)
        rows.append(Row("forward", f"{twin} float32 matmul 2048^3", f"{r['matmul_rate'] / 1e9:.0f} GFLOP/s"))
        for f in r["forward"]:
            ratio = f["flops"] / r["matmul_rate"] / f["seconds"]
            goal = 0.90 if (f["batch"], f["length"]) == (4, 512) else None
            compile_note = f", compile {f['compile']:.1f} s" if twin == "flax" else ""
            rows.append(Row("forward", f"{twin} batch {f['batch']} x {f['length']} ({f['flops'] / 1e9:.0f} GFLOP)",
                            f"{f['seconds'] * 1e3:.0f} ms = {ratio:.0%} of matmul bound{compile_note}",
                            f">= {goal:.0%}" if goal else "", ratio >= goal if goal else None))
    return rows


# Sections defined in other modules register themselves when imported.
from parity import bench_vq  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {', '.join(unknown)}; available: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for name in names:
        rows += SECTIONS[name]()
    # Timings are only comparable on a quiet machine: say how busy this one was.
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows.append(Row("machine", f"{os.cpu_count()} CPUs, 1-min load average before / after",
                    f"{load_before:.1f} / {load_after:.1f}"))
    print_table(rows)
    return 0


if __name__ == "__main__":
    # Run the registry of the importable `parity.bench`, the module other sections register in
    # (under `python -m` this file is `__main__`, a second copy).
    from parity.bench import main as registered_main

    sys.exit(registered_main())
