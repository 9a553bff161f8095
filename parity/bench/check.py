"""The `check` sections of `make bench`: `twinlm check` at real size, float32 with gradients and
every section, on synthetic checkpoints generated once into `cache_dir()`.

- `check`: the 1.1 B TinyLlama-shaped checkpoint, streamed layer by layer (goal: peak RSS <= 3 GB);
- `check-whole` (only when named): the same checkpoint with both whole models loaded (goal: peak
  RSS <= 2.5x both twins' parameters plus gradients, and no OOM); it needs about 15 GB;
- `check7b` (only when named: it writes 13.5 GB once): a Llama-2-7B-shaped bf16 checkpoint,
  streamed (goals: peak RSS <= 8 GB, wall <= 15 min on a 2-core machine).

Each run is a fresh child process: its peak RSS (VmHWM) is its own. Wall times depend on what
else the machine runs: the load average before and after is printed beside them.
"""

from __future__ import annotations

import os
from pathlib import Path

from parity.bench import Row, cache_dir, run_child, section
from parity.bench.checkpoints import _MEASURE, TINYLLAMA, ensure_synthetic, ensure_tinyllama

__all__ = ["LLAMA2_7B", "bench_check", "bench_check7b", "bench_check_whole", "ensure_llama2_7b"]

# Llama-2-7B's shape: 6.74 B parameters, 13.5 GB in bf16 (3 shards of <= 5 GB).
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
GB = 10**9


def ensure_llama2_7b(root: Path) -> Path:
    """The synthetic bf16 Llama-2-7B-shaped checkpoint (13.5 GB), generated once."""
    import ml_dtypes

    return ensure_synthetic(root, "llama2-7b-bf16", LLAMA2_7B, ml_dtypes.bfloat16, "6.7 B-parameter (13.5 GB)")


def _check_child(src: Path, stream: bool) -> dict:
    """`check_checkpoint` float32, every section, in a fresh process: peak RSS, wall, phases."""
    return run_child(_MEASURE + f"""
import jax
jax.config.update("jax_enable_x64", True)
from parity.check import check_checkpoint
from parity.check.memory import model_sizes, streamed_bytes, whole_model_bytes
t0 = time.perf_counter()
report = check_checkpoint({str(src)!r}, "float32", stream={stream}, progress=False)
wall = time.perf_counter() - t0
config = __import__("weights.config", fromlist=["ModelConfig"]).ModelConfig.from_pretrained({str(src)!r})
sizes = model_sizes(config, "causal_lm")
kw = dict(gradients=True, batch=3, seq_len=16, sizes=sizes)
print(json.dumps({{"wall": wall, "cpu": cpu_seconds(), "rss": peak_rss(), "passed": report.passed,
                  "timings": report.meta["timings"], "params": sizes.total, "failures": len(report.failures()),
                  "estimate_whole": whole_model_bytes(config, "causal_lm", "float32", **kw),
                  "estimate_streamed": streamed_bytes(config, "causal_lm", "float32", **kw)}}))
""")


def _rows(name: str, label: str, m: dict, rss_goal: float, rss_goal_text: str, wall_goal: float | None,
          load: tuple[float, float]) -> list[Row]:
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in m["timings"].items() if k != "total")
    estimate = m["estimate_streamed" if "streamed" in label else "estimate_whole"]
    rows = [Row(name, f"{label}: passes", "yes" if m["passed"] else f"no ({m['failures']} rows fail)", "yes",
                m["passed"]),
            Row(name, f"{label}: peak RSS", f"{m['rss'] / GB:.2f} GB (estimate {estimate / GB:.2f} GB)",
                rss_goal_text, m["rss"] <= rss_goal),
            Row(name, f"{label}: wall", f"{m['wall']:.0f} s (CPU {m['cpu']:.0f} s; {phases}; load average "
                f"{load[0]:.1f} -> {load[1]:.1f})", f"<= {wall_goal / 60:.0f} min" if wall_goal else "",
                (m["wall"] <= wall_goal) if wall_goal else None)]
    return rows


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


@section("check")
def bench_check() -> list[Row]:
    """The 1.1 B checkpoint checked layer by layer, float32 with gradients, every section."""
    src = ensure_tinyllama(cache_dir())
    before = _load()
    m = _check_child(src, stream=True)
    return _rows("check", "TinyLlama-1.1B float32, gradients, streamed", m, 3 * GB, "<= 3 GB", None,
                 (before, _load()))


@section("check-whole", default=False)
def bench_check_whole() -> list[Row]:
    """The 1.1 B checkpoint checked with both whole models loaded (about 15 GB): only when named."""
    src = ensure_tinyllama(cache_dir())
    before = _load()
    m = _check_child(src, stream=False)
    both = 2 * 2 * m["params"] * 4  # both twins' float32 parameters and gradients
    rows = _rows("check-whole", "TinyLlama-1.1B float32, gradients, whole model", m, 2.5 * both,
                 f"<= 2.5 x {both / GB:.1f} GB", None, (before, _load()))
    rows.insert(2, Row("check-whole", "peak RSS / (both twins' parameters + gradients)",
                       f"{m['rss'] / both:.2f}", "<= 2.5", m["rss"] <= 2.5 * both))
    return rows


@section("check7b", default=False)
def bench_check7b() -> list[Row]:
    """The Llama-2-7B-shaped checkpoint checked layer by layer: only when named (13.5 GB on disk)."""
    src = ensure_llama2_7b(cache_dir())
    before = _load()
    m = _check_child(src, stream=True)
    return _rows("check7b", "Llama-2-7B float32, gradients, streamed", m, 8 * GB, "<= 8 GB", 15 * 60,
                 (before, _load()))
