"""The `train` section of `make bench`: `train_step` on the mid-size LLaMA (`generation.MID`,
155 M parameters, float32) in each twin, with and without remat, and in mixed precision, next to
the framework's own matmul-bound estimate from the same run; and the cost of the dropout masks.

Each (twin, remat) runs in its own child process (`OMP_WAIT_POLICY=PASSIVE` for torch, see
`generation`). RSS is read from the kernel: between steps a child holds the parameters and
AdamW's two moments (3 x 623 MB); a step's peak (`VmHWM`, reset after the first step) adds the
gradients, the activations and the optimizer's temporaries, and can be set by the optimizer
update rather than by the activations (torch's foreach AdamW works on whole-model temporaries
after they are freed; glibc keeps freed pages). So the activation memory remat saves is counted
exactly, by each framework's own account (`activation_bytes`): the tensors autograd saves
(torch), XLA's temporary buffers of the compiled forward + backward (Flax). The Flax twin is
measured with XLA's default CPU scheduler and with the sequential one (`SEQUENTIAL_CPU_SCHEDULER`).

Mixed precision (one more child per twin, no remat): the same float32 parameters and AdamW
moments, activations in bfloat16 (weights cast at use, softmax and loss in float32), against the
framework's bfloat16 matmul rate. On a CPU without bfloat16 matrix units (AVX512-BF16, AMX) a
bfloat16 product is slower than a float32 one, so the row says what mixed precision costs there.
What the backward keeps is half-size activations plus each weight's bfloat16 copy (2 bytes per
parameter), so mixed precision saves memory only where activations outweigh the weights.

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

import os
import resource
import time
from typing import Any

import numpy as np

from parity.bench import Row, best, run_child, section
from parity.bench.generation import build, forward_flops, matmul_rate

__all__ = ["TRAIN_SHAPE", "bench_train", "run_train"]

TRAIN_SHAPE = (1, 512)  # rows x tokens per step: 512 tokens, 0.38 TFLOP per step
TRAIN_STEPS = 2  # timed steps (best of), after one that compiles (Flax) and allocates Adam's moments
DROPOUT_RATE = 0.1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


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


def activation_bytes(twin: str, model: Any, ids: np.ndarray) -> int:
    """Bytes a forward pass keeps for the backward pass. torch: every tensor autograd saves
    (counted once per storage by `saved_tensors_hooks`, the parameters left out); remat keeps only
    each layer's inputs. Flax: XLA's temporary buffers of the compiled forward + backward program
    (its own memory plan, `memory_analysis().temp_size_in_bytes`)."""
    if twin == "torch":
        import torch

        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        t_ids = torch.from_numpy(ids)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(t_ids, labels=t_ids).loss
        del loss
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for ptr, n in storages.items() if ptr not in params)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    grads = jax.jit(lambda s, i: jax.grad(lambda s: nnx.merge(graphdef, s)(i, labels=i).loss)(s))
    return int(grads.lower(state, jnp.asarray(ids)).compile().memory_analysis().temp_size_in_bytes)


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


def run_train(twin: str, remat: bool, dtype: str = "float32") -> dict:
    """Every measurement of one (twin, remat, compute dtype) child; parameters float32."""
    config, model, tensors = build(twin, dtype)
    del tensors
    if remat:
        model.gradient_checkpointing_enable()
    model.train()
    batch, length = TRAIN_SHAPE
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, length))
    step = _step_fn(twin, model, ids)
    t0 = time.perf_counter()
    step()  # compiles (Flax), allocates the moments (torch)
    first = time.perf_counter() - t0
    steady = _rss_bytes()  # parameters, moments (and Flax's compiled program): what every step starts from
    _reset_peak()
    seconds = best(step, TRAIN_STEPS)
    out: dict[str, Any] = {"twin": twin, "remat": remat, "dtype": dtype, "seconds": seconds, "first": first,
                           "steady_rss": steady, "step_peak": _peak_bytes(),
                           "activations": activation_bytes(twin, model, ids),
                           "xla_flags": os.environ.get("XLA_FLAGS", ""),
                           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                           "flops": (4 if remat else 3) * forward_flops(config, batch, length),
                           "tokens": batch * length, "matmul_rate": matmul_rate(twin, dtype=dtype)}
    if not remat and dtype == "float32":
        shape = (batch, config.num_attention_heads, length, length)
        out["mask_seconds"] = best(_mask_fn(twin, shape, config.num_hidden_layers), 3)
        out["mask_shape"] = shape
        out["layers"] = config.num_hidden_layers
    out["load"] = os.getloadavg()[0]
    return out


# XLA's default CPU scheduler optimises for concurrency and runs rematerialised forward work early,
# which keeps what remat was meant to free (measured: 8 tiny layers, 104 -> 18 MB of temporaries
# with this flag, 112 -> 104 MB without); GPU and TPU schedule for memory.
SEQUENTIAL_CPU_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _child(twin: str, remat: bool, xla_flags: str = "", dtype: str = "float32") -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if twin == "torch" else dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    code = (f"import json; from parity.bench.training import run_train; "
            f"print(json.dumps(run_train({twin!r}, {remat!r}, {dtype!r})))")
    return run_child(code, env, f"{twin} train benchmark child (remat {remat}, {dtype})")


@section("train")
def bench_train() -> list[Row]:
    """tokens/s of `train_step` against the matmul bound, peak RSS with and without remat, and the
    dropout masks: in-graph hash vs numpy host masks."""
    from weights.shared.dropout import keep_mask

    batch, length = TRAIN_SHAPE
    rows: list[Row] = []
    masks = {}
    for twin in ("torch", "flax"):
        runs = [_child(twin, False), _child(twin, True)]
        if twin == "flax":
            runs.append(_child(twin, True, SEQUENTIAL_CPU_SCHEDULER))
        off = runs[0]
        masks[twin] = off
        rows.append(Row("train", f"{twin} float32 matmul 2048^3", f"{off['matmul_rate'] / 1e9:.0f} GFLOP/s"))
        for r in runs:
            bound = r["flops"] / r["matmul_rate"]
            what = ("remat" if r["remat"] else "no remat") + (f", XLA_FLAGS {SEQUENTIAL_CPU_SCHEDULER}"
                                                             if SEQUENTIAL_CPU_SCHEDULER in r["xla_flags"] else "")
            rows.append(Row("train", f"{twin} {what}, batch {batch} x {length} ({r['flops'] / 1e12:.2f} TFLOP/step)",
                            f"{r['tokens'] / r['seconds']:.0f} tok/s, {r['seconds']:.1f} s/step = "
                            f"{bound / r['seconds']:.0%} of matmul bound ({r['tokens'] / bound:.0f} tok/s); "
                            f"peak RSS {r['step_peak'] / 1e9:.2f} GB in a step, {r['steady_rss'] / 1e9:.2f} GB "
                            f"between steps; activations kept for the backward {r['activations'] / 1e6:.0f} MB "
                            f"(first step {r['first']:.1f} s, load {r['load']:.1f})"))
        for r in runs[1:]:
            saved = off["activations"] - r["activations"]
            flags = " (sequential XLA CPU scheduler)" if r["xla_flags"] else ""
            rows.append(Row("train", f"{twin} activation memory remat saves{flags}",
                            f"{saved / 1e6:.0f} of {off['activations'] / 1e6:.0f} MB ({saved / off['activations']:.0%}); "
                            f"step peak RSS {off['step_peak'] / 1e9:.2f} -> {r['step_peak'] / 1e9:.2f} GB; "
                            f"{r['seconds'] / off['seconds']:.2f}x the step time"))
        mixed = _child(twin, False, dtype="bfloat16")
        bound = mixed["flops"] / mixed["matmul_rate"]
        rows.append(Row("train", f"{twin} mixed precision (bfloat16 products, float32 parameters and AdamW moments), "
                                 f"no remat, batch {batch} x {length}",
                        f"{mixed['tokens'] / mixed['seconds']:.0f} tok/s, {mixed['seconds']:.1f} s/step = "
                        f"{off['seconds'] / mixed['seconds']:.2f}x float32's speed, {bound / mixed['seconds']:.0%} of "
                        f"the bfloat16 matmul bound ({mixed['matmul_rate'] / 1e9:.0f} GFLOP/s 2048^3); peak RSS "
                        f"{mixed['step_peak'] / 1e9:.2f} GB in a step (float32 {off['step_peak'] / 1e9:.2f}), "
                        f"{mixed['steady_rss'] / 1e9:.2f} GB between steps; kept for the backward "
                        f"{mixed['activations'] / 1e6:.0f} MB (float32 {off['activations'] / 1e6:.0f}: mixed keeps "
                        f"half-size activations and each weight's bfloat16 copy, cast at use) (load {mixed['load']:.1f})"))
    for twin, off in masks.items():
        shape = tuple(off["mask_shape"])
        rows.append(Row("train", f"{twin} dropout masks in the program, {off['layers']} layers x {list(shape)}",
                        f"{off['mask_seconds'] * 1e3:.0f} ms/step"))
    n_layers = off["layers"]
    host = best(lambda: keep_mask(0, 1, 0, "attention", shape, DROPOUT_RATE), 2) * n_layers
    shipped = int(np.prod(shape)) * n_layers  # one byte per element as bool
    rows.append(Row("train", f"numpy host masks (the alternative), {n_layers} layers x {list(shape)}",
                    f"{host * 1e3:.0f} ms/step on the host + {shipped / 1e6:.0f} MB/step to ship"))
    return rows
