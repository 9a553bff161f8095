"""The `flax_compile` section (run only when named): the Flax twin's compile time and decode speed
with its layers unrolled (the reference loop) against scanned (`DecoderModel.scan_layers`: one
`lax.scan` over a stacked copy of the layers' parameters, so XLA compiles one layer).

Every setting runs in a fresh child process, so no compilation cache (XLA's kernels, GPU gemm
autotuning) carries from one setting to the next. A third setting measures JAX's persistent
compilation cache (`JAX_COMPILATION_CACHE_DIR`, a temporary directory here): a first process fills
it, and a second process's first call, with the loop, is what a user's second run costs.

- CPU (`--device cpu`, the default): seconds to trace, lower and compile the `generate()` program
  (batch 1, a 32-token prompt, 128 new tokens) with abstract weights (no memory), at the 22-layer
  TinyLlama-1.1B shape in bfloat16 and at the demo's 2-layer model in float32. Compile time is
  host work, so the CPU figure tracks the GPU's; it is not the same number.
- GPU (`--device cuda`): the 1.1B bf16 shape with random weights made on the device; per batch
  (1 and 8) the first `generate()` call (compile + run, the issue's "first call" figure), then
  decode tokens/s (median of `TWINLM_BENCH_REPEAT` calls, default 3; 128 new tokens); then scan
  again with XLA:GPU's dynamic-slice fusion forced on (`DYNAMIC_SLICE_FUSION`: the GEMMs read
  each layer's weights in place in the stack instead of a copy sliced out per step). The
  settings take one to two minutes together on an H100.

`python -m parity.bench flax_compile --device cuda`
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np

from parity.bench import Row, options, run_child, section

__all__ = ["bench_flax_compile", "compile_seconds", "gpu_generate_figures"]

PROMPT, NEW, GPU_BATCHES = 32, 128, (1, 8)
DYNAMIC_SLICE_FUSION = "--xla_gpu_enable_dynamic_slice_fusion=true"


def _model(config, dtype, scan: bool, abstract: bool):
    """The Flax causal LM of `config` (abstract: shapes only), layers scanned or not."""
    import jax.numpy as jnp
    from flax import nnx

    import flax_impl

    build = lambda: flax_impl.ForCausalLM(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))  # noqa: E731
    model = nnx.eval_shape(build) if abstract else build()
    model.model.scan_layers = scan
    return model


def compile_seconds(config, dtype: str, scan: bool, batch: int = 1) -> dict[str, float]:
    """Seconds to trace, lower and compile the greedy `generate()` program of `config` (a `PROMPT`-
    token prompt, `NEW` new tokens), abstract weights: the arguments `generate()` would pass to its
    jitted function are captured, then compiled ahead of time without running."""
    from flax_impl import generation

    model = _model(config, dtype, scan, abstract=True)
    captured = {}

    class Captured(Exception):
        pass

    def capture(*args, **kwargs):
        captured.update(args=args, kwargs=kwargs)
        raise Captured

    compiled_fn, generation._generate_compiled = generation._generate_compiled, capture
    try:
        generation.generate(model, np.zeros((batch, PROMPT), np.int32), max_new_tokens=NEW)
    except Captured:
        pass
    finally:
        generation._generate_compiled = compiled_fn
    t0, cpu0 = time.perf_counter(), time.process_time()
    traced = compiled_fn.trace(*captured["args"], **captured["kwargs"])
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3, cpu3 = time.perf_counter(), time.process_time()
    # CPU seconds too: on a shared machine the wall clock counts other processes' time.
    return {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2, "total": t3 - t0, "cpu": cpu3 - cpu0}


def gpu_generate_figures(scan: bool, repeat: int = 3, config_expr: str = "ModelConfig(**TINYLLAMA)",
                         accelerator: bool = True, batches: tuple[int, ...] = GPU_BATCHES) -> dict[str, dict[str, float]]:
    """On JAX's default device (an accelerator unless `accelerator` is False, for a CPU dry run):
    the model of `config_expr` (the 1.1B shape) in bf16, random normal(0, 0.02) matrices and
    unit norms made on the device; per batch, the first `generate()` call's seconds and the
    decode rate (median of `repeat` further calls)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_impl.generation import generate

    if accelerator and jax.default_backend() == "cpu":
        raise RuntimeError("JAX has no accelerator backend here (jax.default_backend() is 'cpu')")
    config = _config(config_expr)
    model = _model(config, "bfloat16", scan, abstract=True)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def draw(key, shape, dtype):
        return (jax.random.normal(key, shape, jnp.float32) * config.initializer_range).astype(dtype)

    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model))):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        var.set_value(draw(jax.random.key(i), shape, dtype) if len(shape) == 2 else jnp.ones(shape, dtype))
    rng = np.random.default_rng(0)
    out = {"device": str(jax.devices()[0].device_kind)}
    for b in batches:
        ids = rng.integers(0, config.vocab_size, (b, PROMPT))
        t0 = time.perf_counter()
        np.asarray(generate(model, ids, max_new_tokens=NEW))
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            np.asarray(generate(model, ids, max_new_tokens=NEW))
            times.append(time.perf_counter() - t0)
        run = statistics.median(times)
        out[f"b{b}"] = {"first": first, "run": run, "tok_s": b * NEW / run}
    return out


def _child(call: str, cache: str | None = None, xla_flags: str | None = None) -> dict:
    """`call`'s JSON in a fresh interpreter; `cache`: JAX's persistent compilation cache directory;
    `xla_flags`: appended to XLA_FLAGS."""
    code = "import json\nfrom parity.bench.flax_compile import _config, compile_seconds, gpu_generate_figures\n"
    env = None
    if cache is not None:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if xla_flags is not None:
        env = dict(env or os.environ)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    return run_child(f"{code}print(json.dumps({call}))", env=env, what=f"flax_compile child ({call})")


def _warm_cache(call: str) -> dict:
    """`call` in a second process, after a first one filled a fresh persistent compilation cache."""
    with tempfile.TemporaryDirectory(prefix="twinlm-jax-cache-") as cache:
        _child(call, cache)
        return _child(call, cache)


def _cpu_rows() -> list[Row]:
    rows = []
    shapes = [("TinyLlama-1.1B shape, 22 layers, bf16", "ModelConfig(**TINYLLAMA)", "bfloat16"),
              ("demo model, 2 layers, f32", "tiny_config()", "float32")]
    for label, config, dtype in shapes:
        figures = {}
        for scan in (False, True):
            figures[scan] = _child(f"compile_seconds(_config({config!r}), {dtype!r}, {scan})")
        loop, scan = figures[False], figures[True]
        detail = lambda f: (f"{f['total']:.1f} s, {f['cpu']:.1f} CPU s (trace {f['trace']:.1f}, "  # noqa: E731
                            f"lower {f['lower']:.1f}, compile {f['compile']:.1f})")
        rows.append(Row("flax_compile", f"generate() program, {label}: loop", detail(loop)))
        rows.append(Row("flax_compile", f"generate() program, {label}: scan", detail(scan),
                        f"{loop['cpu'] / scan['cpu']:.1f}x less CPU time than the loop"))
        warm = _warm_cache(f"compile_seconds(_config({config!r}), {dtype!r}, False)")
        rows.append(Row("flax_compile", f"generate() program, {label}: loop, persistent cache filled", detail(warm)))
    return rows


def _config(expr: str):
    """A config from a short expression (the child's argument): TinyLlama's shape or the demo's."""
    from parity.bench.checkpoints import TINYLLAMA
    from parity.demo import tiny_config
    from weights.config import ModelConfig

    return eval(expr, {"ModelConfig": ModelConfig, "TINYLLAMA": TINYLLAMA, "tiny_config": tiny_config})  # noqa: S307


def _gpu_rows() -> list[Row]:
    repeat = max(1, int(os.environ.get("TWINLM_BENCH_REPEAT", "3")))
    rows = []
    try:
        figures = {scan: _child(f"gpu_generate_figures({scan}, {repeat})") for scan in (False, True)}
        warm = _warm_cache("gpu_generate_figures(False, 1, batches=(1,))")
    except RuntimeError as e:  # a bench reports what it could not measure
        return [Row("flax_compile", "device cuda", f"not measured: {str(e).strip().splitlines()[-1]}", "", None)]
    rows.append(Row("flax_compile", "device, model", f"{figures[False]['device']}, 1.1B shape bf16, {PROMPT}-token "
                    f"prompt, {NEW} new tokens, median of {repeat}"))
    for b in GPU_BATCHES:
        for scan in (False, True):
            f = figures[scan][f"b{b}"]
            name = "scan" if scan else "loop"
            rows.append(Row("flax_compile", f"b{b} first generate() call, {name} (compile + run)",
                            f"{f['first']:.1f} s (compile ~{f['first'] - f['run']:.1f} s)", "<= 3 s",
                            f["first"] <= 3.0))
            rows.append(Row("flax_compile", f"b{b} decode, {name}", f"{f['tok_s']:.0f} tok/s ({f['run'] * 1e3:.0f} ms)"))
    f = warm["b1"]
    rows.append(Row("flax_compile", "b1 first generate() call, loop, persistent cache filled by an earlier process",
                    f"{f['first']:.1f} s", "<= 3 s", f["first"] <= 3.0))
    # Each scanned step slices its layer's weights out of the stack; unless the GEMM reads the slice
    # in place (XLA:GPU's dynamic-slice fusion, off by default in some XLA versions), that is a
    # copy of every weight per step. Measured with the fusion forced on:
    try:
        fused = _child(f"gpu_generate_figures(True, {repeat})", xla_flags=DYNAMIC_SLICE_FUSION)
    except RuntimeError as e:
        return rows + [Row("flax_compile", f"scan with {DYNAMIC_SLICE_FUSION}",
                           f"not measured: {str(e).strip().splitlines()[-1]}", "", None)]
    for b in GPU_BATCHES:
        f = fused[f"b{b}"]
        rows.append(Row("flax_compile", f"b{b} decode, scan, {DYNAMIC_SLICE_FUSION}",
                        f"{f['tok_s']:.0f} tok/s ({f['run'] * 1e3:.0f} ms; first call {f['first']:.1f} s)"))
    return rows


@section("flax_compile", default=False)
def bench_flax_compile() -> list[Row]:
    """The Flax twin's compile time and decode speed, layers unrolled vs scanned (module doc)."""
    return _gpu_rows() if options().device == "cuda" else _cpu_rows()
