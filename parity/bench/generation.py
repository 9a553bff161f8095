"""The `decode` and `forward` sections of `make bench`, and the measurements behind them.

Each twin is measured in its own child process, so neither framework's thread pool runs beside
the other's. Both children build the same mid-size random model from numpy (`mid_weights`: one
seeded generator per HF tensor name), so the torch child never imports jax and vice versa.

The torch child runs with `OMP_WAIT_POLICY=PASSIVE`: with libgomp's default spin-then-sleep
policy, on a 2-vCPU machine shared with other work, a spinning worker steals the core its
partner needs and every small parallel op waits for a time slice (measured: 224 ms per decode
step instead of 41 ms, load average 4). Passive waiting costs nothing measurable when the
machine is idle.

Bounds:
- decode: a step must read every weight matrix once (all parameters but the input embedding
  table, of which it only gathers B rows). The bandwidth is the best of several full reads,
  in either framework: a sum and a matrix-vector product over a 1 GiB float32 buffer, and a
  vector-matrix product with every weight matrix of the model itself.
- forward: the FLOPs of every linear layer, the LM head and the eager attention's two matmuls,
  at the framework's own float32 rate on a 2048^3 matmul.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from typing import Any, Callable

import numpy as np

from parity.bench import ROOT, Row, best, section

__all__ = ["DECODE_GOALS", "MID", "bench_decode", "bench_forward", "measure", "run_twin"]

# A mid-size random LLaMA in float32: 155 M parameters (623 MB), 131 MB of them the embedding.
MID = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
           num_attention_heads=16, num_key_value_heads=4)
DECODE_PROMPT, DECODE_NEW, DECODE_BATCHES = 32, 64, (1, 8)
FORWARD_SHAPES = ((1, 128), (4, 512))
EMBEDDING = "model.embed_tokens.weight"


def mid_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """HF-named float32 tensors: normal(0, 0.02) for matrices, ones for norms; one generator per
    name (seeded by its CRC32), so both children build identical weights."""
    out = {}
    for name, shape in sorted(shapes.items()):
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02) if len(shape) == 2
                     else np.ones(shape, np.float32))
    return out


def build(twin: str, dtype: str = "float32") -> tuple[Any, Any, dict[str, np.ndarray]]:
    """(config, model, HF-layout tensors) of the mid-size model, without a random init: float32
    parameters, activations in `dtype` ("bfloat16": mixed precision, weights cast at use)."""
    from weights.config import ModelConfig

    config = ModelConfig(**MID)
    if twin == "torch":
        import torch

        import torch_impl
        from torch_impl.checkpoint import load_numpy_state
        from torch_impl.layers.precision import to_dtype

        with torch.device("meta"):
            model = torch_impl.ForCausalLM(config, dtype=to_dtype(dtype), param_dtype=torch.float32)
        model = model.to_empty(device="cpu")
        tensors = mid_weights({k: tuple(v.shape) for k, v in model.state_dict().items()})
        load_numpy_state(model, tensors)
        return config, model, tensors
    import jax.numpy as jnp
    from flax import nnx

    import flax_impl
    from flax_impl.layers.precision import to_dtype
    from weights.names import hf_name, is_transposed

    model = nnx.eval_shape(lambda: flax_impl.ForCausalLM(config, dtype=to_dtype(dtype), param_dtype=jnp.float32,
                                                         rngs=nnx.Rngs(0)))
    flat = list(nnx.to_flat_state(nnx.state(model)))
    shapes = {}
    for path, var in flat:
        name, shape = hf_name(path), tuple(var.get_value().shape)
        shapes[name] = shape[::-1] if is_transposed(name) else shape
    tensors = mid_weights(shapes)
    for path, var in flat:
        name = hf_name(path)
        var.set_value(jnp.asarray(np.ascontiguousarray(tensors[name].T) if is_transposed(name) else tensors[name]))
    return config, model, tensors


def bandwidth_probes(twin: str, model, tensors: dict[str, np.ndarray]) -> dict[str, float]:
    """Bytes/s of full reads (best of 8 each): `sum` and `matvec` of a 1 GiB float32 buffer, and
    `weights`, a vector times every weight matrix a decode step reads."""
    n = 1 << 28
    step_bytes = sum(a.nbytes for k, a in tensors.items() if k != EMBEDDING and a.ndim == 2)
    if twin == "torch":
        import torch
        import torch.nn.functional as F

        x, v = torch.ones(n), torch.ones(1024)
        out = {"sum": 4 * n / best(lambda: x.sum(), 8), "matvec": 4 * n / best(lambda: torch.mv(x.view(-1, 1024), v), 8)}
        del x
        mats = [p for k, p in model.state_dict().items() if k != EMBEDDING and p.dim() == 2]
        ones = {m.shape[1]: torch.ones(1, m.shape[1]) for m in mats}
        with torch.inference_mode():
            out["weights"] = step_bytes / best(lambda: [F.linear(ones[m.shape[1]], m) for m in mats], 8)
        return out
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from weights.names import hf_name

    y, w = jnp.ones((n // 1024, 1024), jnp.float32), jnp.ones(1024, jnp.float32)
    total, matvec = jax.jit(jnp.sum), jax.jit(jnp.dot)
    jax.block_until_ready((total(y), matvec(y, w)))
    out = {"sum": 4 * n / best(lambda: total(y).block_until_ready(), 8),
           "matvec": 4 * n / best(lambda: matvec(y, w).block_until_ready(), 8)}
    del y
    mats = [var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))
            if hf_name(path) != EMBEDDING and var.get_value().ndim == 2]  # kernels [in, out]
    stream = jax.jit(lambda ms: [jnp.ones((1, m.shape[0]), m.dtype) @ m for m in ms])
    jax.block_until_ready(stream(mats))
    out["weights"] = step_bytes / best(lambda: jax.block_until_ready(stream(mats)), 8)
    return out


def matmul_rate(twin: str, n: int = 2048, dtype: str = "float32") -> float:
    """FLOP/s of the framework on an n x n matmul in `dtype` (best of 5)."""
    if twin == "torch":
        import torch

        from torch_impl.layers.precision import to_dtype

        a = torch.randn(n, n).to(to_dtype(dtype))
        return 2 * n ** 3 / best(lambda: a @ a, 5)
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    return 2 * n ** 3 / best(lambda: mm(a, a).block_until_ready(), 5)


def generate_fn(twin: str, model, ids: np.ndarray, new: int) -> Callable[[], object]:
    """A call of the twin's `generate` (greedy, no eos: all `new` steps run), results on the host."""
    if twin == "torch":
        import torch

        from torch_impl.generation import generate

        return lambda: generate(model, torch.from_numpy(ids), max_new_tokens=new)
    import jax.numpy as jnp

    from flax_impl.generation import generate

    return lambda: np.asarray(generate(model, jnp.asarray(ids), max_new_tokens=new))


def forward_fn(twin: str, model, ids: np.ndarray) -> Callable[[], object]:
    """One forward pass to the logits of every position (torch under inference_mode, Flax jitted)."""
    if twin == "torch":
        import torch

        t_ids = torch.from_numpy(ids)

        def run():
            with torch.inference_mode():
                return model(t_ids).logits
        return run
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i).logits)
    j_ids = jax.numpy.asarray(ids)
    return lambda: forward(state, j_ids).block_until_ready()


def forward_flops(config, batch: int, length: int) -> float:
    """2 x multiply-adds of one forward pass: every linear layer and the LM head per token, and the
    eager attention's score and value matmuls over the full T x T square."""
    e, h, d = config.hidden_size, config.num_attention_heads, config.resolved_head_dim
    k, i, v = config.resolved_num_key_value_heads, config.intermediate_size, config.vocab_size
    per_layer = e * h * d * 2 + e * k * d * 2 + 3 * e * i
    tokens = batch * length
    linear = 2 * tokens * (config.num_hidden_layers * per_layer + e * v)
    attention = 2 * 2 * batch * h * length * length * d * config.num_hidden_layers
    return float(linear + attention)


def run_twin(twin: str) -> dict:
    """Every measurement of one twin (run in a child process by `measure`)."""
    config, model, tensors = build(twin)
    out: dict[str, Any] = {"twin": twin, "param_bytes": sum(a.nbytes for a in tensors.values()),
                           "step_bytes": sum(a.nbytes for k, a in tensors.items() if k != EMBEDDING)}
    out["bandwidth"] = bandwidth_probes(twin, model, tensors)
    rng = np.random.default_rng(0)
    out["decode"] = []
    for batch in DECODE_BATCHES:
        ids = rng.integers(0, config.vocab_size, (batch, DECODE_PROMPT))
        full, first = generate_fn(twin, model, ids, DECODE_NEW), generate_fn(twin, model, ids, 1)
        cold = best(full, 1) + best(first, 1)  # compilation (Flax) + one run of each
        t_full, t_first = best(full, 4), best(first, 5)
        out["decode"].append(dict(batch=batch, step=(t_full - t_first) / (DECODE_NEW - 1), full=t_full,
                                  compile=cold - t_full - t_first))
    rate = matmul_rate(twin)
    out["forward"] = []
    for batch, length in FORWARD_SHAPES:
        run = forward_fn(twin, model, rng.integers(0, config.vocab_size, (batch, length)))
        cold = best(run, 1)
        seconds = best(run, 3)
        out["forward"].append(dict(batch=batch, length=length, seconds=seconds, compile=cold - seconds,
                                   flops=forward_flops(config, batch, length)))
    out["matmul_rate"] = max(rate, matmul_rate(twin))  # probed before and after the runs
    if twin == "torch":
        import torch

        out["threads"] = torch.get_num_threads()
    out["load"] = os.getloadavg()[0]
    return out


_RESULTS: dict[str, dict] = {}


def measure(twin: str) -> dict:
    """`run_twin(twin)` in a fresh interpreter (cached: the decode and forward sections share it)."""
    if twin not in _RESULTS:
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if twin == "torch" else dict(os.environ)
        code = f"import json; from parity.bench.generation import run_twin; print(json.dumps(run_twin({twin!r})))"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{twin} benchmark child failed:\n{proc.stderr[-3000:]}")
        _RESULTS[twin] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _RESULTS[twin]


# ---- the sections: one child per twin (`measure`), shared by decode and forward ----
DECODE_GOALS = {("flax", 1): 0.95, ("torch", 1): 0.70, ("flax", 8): 0.60, ("torch", 8): 0.40}


@section("decode")
def bench_decode() -> list[Row]:
    """Greedy decode (prompt 32, 64 new tokens) against the bandwidth bound: one step must read
    every weight matrix once. A step is (t(64 new) - t(1 new)) / 63, so the prefill is excluded."""
    results = [measure(twin) for twin in ("torch", "flax")]
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
                            f"(end to end {d['batch'] * DECODE_NEW / d['full']:.1f} tok/s"
                            + (f"; compile {d['compile']:.1f} s)" if r["twin"] == "flax" else ")"),
                            f">= {goal:.0%}", ratio >= goal))
    return rows


@section("forward")
def bench_forward() -> list[Row]:
    """Forward latency (logits of every position) against FLOPs / the framework's own float32
    matmul rate (2048^3, best of the probes before and after the runs)."""
    rows = []
    for twin in ("torch", "flax"):
        r = measure(twin)
        rows.append(Row("forward", f"{twin} float32 matmul 2048^3", f"{r['matmul_rate'] / 1e9:.0f} GFLOP/s"))
        for f in r["forward"]:
            ratio = f["flops"] / r["matmul_rate"] / f["seconds"]
            goal = 0.90 if (f["batch"], f["length"]) == (4, 512) else None
            compile_note = f", compile {f['compile']:.1f} s" if twin == "flax" else ""
            rows.append(Row("forward", f"{twin} batch {f['batch']} x {f['length']} ({f['flops'] / 1e9:.0f} GFLOP)",
                            f"{f['seconds'] * 1e3:.0f} ms = {ratio:.0%} of matmul bound{compile_note}",
                            f">= {goal:.0%}" if goal else "", ratio >= goal if goal else None))
    return rows
