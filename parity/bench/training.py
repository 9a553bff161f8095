"""The `train` section of `make bench`: `train_step` on the mid-size LLaMA (`generation.MID`,
155 M parameters, float32) in each twin, with and without remat, next to the framework's own
matmul-bound estimate from the same run; and the cost of the dropout masks.

Each (twin, remat) runs in its own child process (`OMP_WAIT_POLICY=PASSIVE` for torch, see
`generation`), so its peak RSS is its own: the parameters, their gradients, AdamW's two moments
(4 x 623 MB) and the step's activations. The difference between the remat-off and remat-on
children of one twin is the activation memory remat saves; everything else is equal.

Bound: one step is a forward and a backward pass, 3 x the forward FLOPs (`generation.forward_flops`:
every linear layer, the LM head, the eager attention's two matmuls; the backward pass has two
matmuls per forward one), 4 x with remat (each layer's forward runs again), at the framework's
float32 matmul rate (`generation.matmul_rate`, 2048^3, best of the probes before and after).

Dropout masks: drawn inside each twin's program by a counter-based hash
(`weights.shared.dropout`). The alternative, numpy masks made on the host each step and shipped
to the device, is timed here too (the numpy specification itself on one attention map), with the
bytes per step it would ship.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from parity.bench import ROOT, Row, best, section
from parity.bench.generation import build, forward_flops, matmul_rate

__all__ = ["TRAIN_SHAPE", "bench_train", "run_train"]

TRAIN_SHAPE = (1, 512)  # rows x tokens per step: 512 tokens, 0.38 TFLOP per step
TRAIN_STEPS = 2  # timed steps (best of), after one that compiles (Flax) and allocates Adam's moments
DROPOUT_RATE = 0.1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _step_fn(twin: str, model: Any, ids: np.ndarray):
    from weights.shared.training import TrainingHParams

    hparams = TrainingHParams(learning_rate=1e-4, weight_decay=0.01, warmup_steps=1, max_steps=100)
    if twin == "torch":
        import torch

        from torch_impl.training import make_optimizer, train_step

        optimizer = make_optimizer(model, hparams)
        batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(ids)}
        return lambda: float(train_step(model, optimizer, batch)["loss"])
    import jax.numpy as jnp

    from flax_impl.training import make_optimizer, train_step

    optimizer = make_optimizer(model, hparams)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
    return lambda: float(train_step(model, optimizer, batch)["loss"])


def _mask_fn(twin: str, shape: tuple[int, ...], layers: int):
    """One step's attention-dropout masks (every layer), drawn the twin's way."""
    from weights.shared.dropout import dropout_key

    key = dropout_key(0, 1)
    if twin == "torch":
        import torch

        from torch_impl.layers.dropout import keep_mask

        t_key = torch.from_numpy(key)
        return lambda: [keep_mask(t_key, shape, DROPOUT_RATE, layer, "attention") for layer in range(layers)]
    import jax
    import jax.numpy as jnp

    from flax_impl.layers.dropout import keep_mask

    masks = jax.jit(lambda k: [keep_mask(k, shape, DROPOUT_RATE, layer, "attention") for layer in range(layers)])
    j_key = jnp.asarray(key)
    jax.block_until_ready(masks(j_key))
    return lambda: jax.block_until_ready(masks(j_key))


def run_train(twin: str, remat: bool) -> dict:
    """Every measurement of one (twin, remat) child."""
    config, model, tensors = build(twin)
    del tensors
    if remat:
        model.gradient_checkpointing_enable()
    model.train()
    batch, length = TRAIN_SHAPE
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, length))
    step = _step_fn(twin, model, ids)
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    step()  # compiles (Flax), allocates the moments (torch)
    first = time.perf_counter() - t0
    seconds = best(step, TRAIN_STEPS)
    out: dict[str, Any] = {"twin": twin, "remat": remat, "seconds": seconds, "first": first,
                           "rss_before": rss_before,
                           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                           "flops": (4 if remat else 3) * forward_flops(config, batch, length),
                           "tokens": batch * length, "matmul_rate": matmul_rate(twin)}
    if not remat:
        shape = (batch, config.num_attention_heads, length, length)
        out["mask_seconds"] = best(_mask_fn(twin, shape, config.num_hidden_layers), 3)
        out["mask_shape"] = shape
        out["layers"] = config.num_hidden_layers
    out["load"] = os.getloadavg()[0]
    return out


def _child(twin: str, remat: bool) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if twin == "torch" else dict(os.environ)
    code = (f"import json; from parity.bench.training import run_train; "
            f"print(json.dumps(run_train({twin!r}, {remat!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{twin} train benchmark child (remat {remat}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@section("train")
def bench_train() -> list[Row]:
    """tokens/s of `train_step` against the matmul bound, peak RSS with and without remat, and the
    dropout masks: in-graph hash vs numpy host masks."""
    from weights.shared.dropout import keep_mask

    batch, length = TRAIN_SHAPE
    rows: list[Row] = []
    for twin in ("torch", "flax"):
        off, on = _child(twin, False), _child(twin, True)
        rows.append(Row("train", f"{twin} float32 matmul 2048^3", f"{off['matmul_rate'] / 1e9:.0f} GFLOP/s"))
        for r in (off, on):
            bound = r["flops"] / r["matmul_rate"]
            what = "remat" if r["remat"] else "no remat"
            rows.append(Row("train", f"{twin} {what}, batch {batch} x {length} ({r['flops'] / 1e12:.2f} TFLOP/step)",
                            f"{r['tokens'] / r['seconds']:.0f} tok/s, {r['seconds']:.1f} s/step = "
                            f"{bound / r['seconds']:.0%} of matmul bound ({r['tokens'] / bound:.0f} tok/s); "
                            f"peak RSS {r['peak_rss'] / 1e9:.2f} GB (first step {r['first']:.1f} s, "
                            f"load {r['load']:.1f})"))
        saved = off["peak_rss"] - on["peak_rss"]
        rows.append(Row("train", f"{twin} activation memory remat saves", f"{saved / 1e9:.2f} GB of peak RSS "
                        f"({saved / off['peak_rss']:.0%}), at {on['seconds'] / off['seconds']:.2f}x the step time"))
        shape = tuple(off["mask_shape"])
        rows.append(Row("train", f"{twin} dropout masks in the program, {off['layers']} layers x {list(shape)}",
                        f"{off['mask_seconds'] * 1e3:.0f} ms/step"))
    n_layers = rows and off["layers"]
    host = best(lambda: keep_mask(0, 1, 0, "attention", shape, DROPOUT_RATE), 2) * n_layers
    shipped = int(np.prod(shape)) * n_layers  # one byte per element as bool
    rows.append(Row("train", f"numpy host masks (the alternative), {n_layers} layers x {list(shape)}",
                    f"{host * 1e3:.0f} ms/step on the host + {shipped / 1e6:.0f} MB/step to ship"))
    return rows
