"""The `convert` and `load` sections of `make bench`: the converter against a plain copy of the
same bytes, and `from_pretrained`'s peak memory, on a synthetic bf16 checkpoint of TinyLlama-1.1B's
shape (generated once into `cache_dir()`).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from parity.bench import Row, cache_dir, options, run_child, section

__all__ = ["TINYLLAMA", "bench_convert", "bench_load", "ensure_synthetic", "ensure_tinyllama"]

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


def ensure_synthetic(root: Path, name: str, shape: dict, dtype: Any, what: str) -> Path:
    """The synthetic checkpoint `root/name` of config `shape` in `dtype`, generated once (`what`
    names it in the progress line); a cached one whose config differs, or that is broken, is
    generated again."""
    from weights.config import ModelConfig
    from weights.synthetic import write_synthetic_checkpoint

    path = root / name
    config = ModelConfig(**shape)
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if weights and (path / "config.json").is_file():
        try:
            if ModelConfig.from_pretrained(path).replace(architectures=None, torch_dtype=None) == config:
                return path
        except Exception:  # noqa: BLE001 - a stale or broken cache is regenerated
            pass
    print(f"generating the synthetic {what} checkpoint in {path} (once) ...", file=sys.stderr)
    write_synthetic_checkpoint(path, config, dtype=dtype, force=True)
    return path


def ensure_tinyllama(root: Path) -> Path:
    """The synthetic bf16 TinyLlama-shaped checkpoint (2.2 GB), generated once."""
    import ml_dtypes

    return ensure_synthetic(root, "tinyllama-bf16", TINYLLAMA, ml_dtypes.bfloat16, "1.1 B-parameter")


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


# A 2-layer model of the same family, loaded before the baseline is read.
_WARMUP = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)

# Each twin's `from_pretrained` onto `device` ("cpu" or "cuda"), and a statement that starts the
# device (torch's CUDA context, JAX's GPU client) so the baseline holds what any GPU program holds.
_PLACE = {
    ("torch_impl", "cpu"): ("", ""),
    ("torch_impl", "cuda"): ("torch.empty(1, device='cuda'); torch.cuda.synchronize()", ", device='cuda'"),
    ("flax_impl", "cpu"): ("", ""),
    ("flax_impl", "cuda"): ("jax.device_put(0, jax.devices('gpu')[0]).block_until_ready()",
                            ", device=jax.devices('gpu')[0]"),
}


def _load_child(twin: str, src: Path, device: str, warmup: Path) -> dict:
    start, where = _PLACE[twin, device]
    framework = "torch" if twin == "torch_impl" else "jax"
    return run_child(_MEASURE + f"""
import {framework}, {twin}, weights.pretrained
{start}
# A tiny load first: the code pages and device handles any load needs belong to the baseline.
{twin}.ForCausalLM.from_pretrained({str(warmup)!r}{where})  # and dropped
base = peak_rss()
t0 = time.perf_counter()
model = {twin}.ForCausalLM.from_pretrained({str(src)!r}{where})
wall = time.perf_counter() - t0
print(json.dumps({{"wall": wall, "rss": peak_rss(), "base": base}}))
""", env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, what=f"{twin} from_pretrained on {device}")


@section("load")
def bench_load() -> list[Row]:
    """Peak RSS of `from_pretrained` on the 1.1 B bf16 checkpoint, in each twin: on the CPU, against
    the model's bytes; with `--device cuda`, loaded onto the GPU, the host's rise above the
    interpreter's baseline (imports, the started device and a tiny model loaded onto it) against
    the largest tensor."""
    import ml_dtypes

    from weights.checkpoint import CheckpointReader

    device = options().device
    src = ensure_tinyllama(cache_dir())
    warmup = ensure_synthetic(cache_dir(), "load-warmup", _WARMUP, ml_dtypes.bfloat16, "tiny warm-up")
    with CheckpointReader(src) as r:
        model_bytes = sum(r.nbytes(k) for k in r.keys())
        largest = max(r.nbytes(k) for k in r.keys())
    rows = []
    for twin, goal in (("flax_impl", 1.3), ("torch_impl", None)):
        m = _load_child(twin, src, device, warmup)
        if device == "cuda":
            rise = m["rss"] - m["base"]
            rows.append(Row("load", f"{twin}.ForCausalLM.from_pretrained onto cuda: host peak RSS above baseline",
                            f"{rise / 1e6:.0f} MB (baseline {m['base'] / 1e9:.2f} GB)",
                            f"<= {largest / 1e6:.0f} MB (one tensor)", rise <= largest))
        else:
            ratio = m["rss"] / model_bytes
            rows.append(Row("load", f"{twin}.ForCausalLM.from_pretrained: peak RSS / model bytes",
                            f"{ratio:.2f} ({m['rss'] / 1e9:.2f} GB; baseline {m['base'] / 1e9:.2f} GB: "
                            f"imports and a tiny load)",
                            f"<= {goal}" if goal else "", (ratio <= goal) if goal else None))
        rows.append(Row("load", f"{twin}.ForCausalLM.from_pretrained: wall ({device})", f"{m['wall']:.1f} s"))
    return rows
