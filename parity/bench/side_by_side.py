"""The `side_by_side` section of `make bench`: Hugging Face transformers against both twins, in one
process, interleaved, printed as ratios (twin time / HF time: lower is better).

Every system runs the same weights. Each repetition runs every system once, one after the other,
so a change in the machine's speed (other jobs starting or ending) hits all of them alike; the
figure is the median over repetitions of the per-repetition ratio.

- CPU (`--device cpu`, the default): the mid-size random LLaMA of the `decode` / `forward`
  sections (155 M parameters, float32). Workloads: forward (logits of every position) at 1 x 128
  and 4 x 512; greedy generation of 64 new tokens after a 32-token prompt at batch 1 and 8.
  Each is measured twice: on the machine as it is, and while a child process keeps one core
  busy (a user's machine is rarely idle).
- GPU (`--device cuda`): TinyLlama-1.1B's shape in bfloat16, random weights made on the device.
  Forward 1 x 512 and 8 x 512; decode tokens/s at batch 1 and 8 (128 new tokens) against the
  weight-streaming bound (every weight read once per step at the device's measured copy
  bandwidth); the Flax twin's first `generate` call (compile) time; HF with its static cache and
  `torch.compile` as a second HF row.

The torch twin runs four ways: eager attention, fast attention (SDPA), compiled decoding
(`generate(..., compile=True)`: each decode step under `torch.compile`, CUDA graphs on a GPU; its
first call per batch shape compiles, in a warm-up round, untimed), and, on the CPU, eager with
MKL-packed linears (`prepack_linears` for the workload's row counts, packed outside the clock,
on a second model sharing the weights). The Flax twin runs three: eager and fast attention, and,
on the CPU, with `prepack_linears`'s `[out, in]` kernel copies for the workload's row counts
("flax-packed", a module of its own over the same arrays). A row says whether the compiled and
packed systems' tokens equal their eager twin's. Without transformers the HF systems are skipped with a message and the
twins' figures stand alone.

Environment: TWINLM_BENCH_REPEAT (rounds, default 3), TWINLM_BENCH_SYSTEMS (a comma list of
`SYSTEM_KEYS`, default all), TWINLM_BENCH_WORKLOADS (a comma list of "forward", "decode",
"b1", "b8", "busy", "idle": a workload runs when it is of every kind named; default all).

HF transformers: the torch `LlamaForCausalLM` with `attn_implementation="sdpa"`, and on the CPU
HF's `FlaxLlamaForCausalLM` (system "hf-flax", jitted forward and `generate`), the Flax twin's
reference. HF's Flax models were removed in transformers 5: they are measured where transformers
4.x is importable (a row says how to install it beside the project's 5.x), and otherwise the Flax
twin is shown against HF torch only.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from parity.bench import Row, options, section

__all__ = ["GOALS", "SYSTEM_KEYS", "System", "bench_side_by_side", "interleaved", "selected_systems", "wanted"]

CPU_FORWARD, CPU_BATCHES, CPU_PROMPT, CPU_NEW = ((1, 128), (4, 512)), (1, 8), 32, 64
GPU_FORWARD, GPU_BATCHES, GPU_PROMPT, GPU_NEW = ((1, 512), (8, 512)), (1, 8), 32, 128
# Goals of issue 19, as the largest allowed twin / HF time ratio.
GOALS = {("torch", "forward"): 1.0, ("flax", "forward"): 1.0,
         ("torch", "decode"): 1 / 1.5, ("flax", "decode"): 1 / 1.1}
# The systems TWINLM_BENCH_SYSTEMS may name.
SYSTEM_KEYS = ("hf", "hf-static", "hf-flax", "torch", "torch-fast", "torch-compiled", "torch-packed", "flax",
               "flax-fast", "flax-packed")


@dataclass
class System:
    """One implementation under test: how to run each workload, and how to wait for the device."""

    name: str
    forward: Callable[[np.ndarray], Callable[[], Any]] | None  # ids -> a call computing every position's logits
    decode: Callable[[np.ndarray, int], Callable[[], Any]]  # ids, new tokens -> a greedy generate call
    sync: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)
    key: str = ""  # its name in TWINLM_BENCH_SYSTEMS


def selected_systems() -> set[str]:
    """The system keys TWINLM_BENCH_SYSTEMS names (default: all); an unknown key is an error."""
    names = {k.strip() for k in os.environ.get("TWINLM_BENCH_SYSTEMS", ",".join(SYSTEM_KEYS)).split(",") if k.strip()}
    unknown = names - set(SYSTEM_KEYS)
    if unknown:
        raise ValueError(f"TWINLM_BENCH_SYSTEMS: unknown {', '.join(sorted(unknown))}; known: {', '.join(SYSTEM_KEYS)}")
    return names


def wanted(label: str) -> bool:
    """Whether TWINLM_BENCH_WORKLOADS keeps the workload `label`: each kind it names must be in
    the label ("busy": "1 core kept busy", "idle": "as is")."""
    kinds = [k.strip() for k in os.environ.get("TWINLM_BENCH_WORKLOADS", "").split(",") if k.strip()]
    return all({"busy": "kept busy", "idle": "as is"}.get(k, k) in label for k in kinds)


def interleaved(calls: dict[str, Callable[[], Any]], sync: dict[str, Callable[[], None]], repeat: int,
                warmup: int = 1, results: dict[str, Any] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each call, `repeat` rounds, each round calling every system once in turn
    (after `warmup` untimed rounds: compilation, allocator and cache warm-up); `results` receives
    each call's last return value."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeat):
        for name, call in calls.items():
            sync[name]()
            t0 = time.perf_counter()
            out = call()
            sync[name]()
            if results is not None:
                results[name] = out
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], twin: str, reference: str) -> float:
    """Median over rounds of twin time / reference time (pairs taken in the same round)."""
    return statistics.median(a / b for a, b in zip(times[twin], times[reference]))


# ---- the systems ---------------------------------------------------------------------------------

def _llama_config(config, **extra: Any) -> Any:
    """HF's `LlamaConfig` of the bench model's shape (`config`), for HF torch and HF Flax alike."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                       num_attention_heads=config.num_attention_heads,
                       num_key_value_heads=config.resolved_num_key_value_heads,
                       max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                       rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings, **extra)


def _hf_torch(config, state: dict, device: str, dtype, static_compile: bool = False) -> System:
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = _llama_config(config, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config).to(dtype)
    # The twin's own tensors, shared (assign=True): both systems read the same memory. Every
    # parameter name must match (strict): a parameter left on meta would fail only when called.
    model.load_state_dict(state, strict=True, assign=True)
    # The rotary tables are non-persistent buffers (not in any state dict): build them for real.
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(hf_config)
    model.eval()
    name = "HF torch" + (" (static cache + compile)" if static_compile else "")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward(ids):
        t = torch.from_numpy(ids).to(device)

        def run():
            with torch.inference_mode():
                return model(t, use_cache=False).logits
        return run

    def decode(ids, new):
        t = torch.from_numpy(ids).to(device)
        # On CUDA, generate compiles the forward by itself once the cache is static.
        extra = dict(cache_implementation="static") if static_compile else {}

        def run():
            with torch.inference_mode():
                return model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
        return run

    if static_compile:
        model.generation_config.cache_implementation = "static"
    return System(name, forward, decode, sync, key="hf-static" if static_compile else "hf")


def _torch_twin(model, device: str, attn: str = "eager", compile: bool = False, packed: bool = False) -> System:
    """The torch twin with its attention path `attn` ("eager" or "fast"), set at every call: the
    eager and fast systems share one model. With `compile`, greedy decoding runs its steps
    compiled (`generate(..., compile=True)`, eager attention) and there is no forward workload.
    With `packed` (CPU), each workload first packs `model`'s linears for the row counts it
    multiplies (`prepack_linears`): a model of its own, since a pack serves every call of its rows."""
    import torch

    from torch_impl.generation import generate
    from torch_impl.layers.attention import set_attn_implementation
    from torch_impl.layers.linear import prepack_linears

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward(ids):
        t = torch.from_numpy(ids).to(device)
        if packed:
            prepack_linears(model, (ids.size,))

        def run():
            set_attn_implementation(model, attn)
            with torch.inference_mode():
                return model(t).logits
        return run

    def decode(ids, new):
        t = torch.from_numpy(ids).to(device)
        if packed:  # the decode steps' one row per sequence, and the prompt pass
            prepack_linears(model, (ids.shape[0], ids.size))

        def run():
            set_attn_implementation(model, attn)
            return generate(model, t, max_new_tokens=new, compile=compile)
        return run

    if compile:
        return System("torch twin (compiled)", None, decode, sync, key="torch-compiled")
    if packed:
        return System("torch twin (packed)", forward, decode, sync, key="torch-packed")
    return System("torch twin" + (" (fast)" if attn == "fast" else ""), forward, decode, sync,
                  key="torch-fast" if attn == "fast" else "torch")


def _flax_twin(model, attn: str = "eager", packed: bool = False) -> System:
    """The Flax twin with its attention path `attn`; the switch is part of the graph definition,
    so each path compiles its own program. With `packed` (CPU), each workload first gives
    `model`'s linears their `[out, in]` copies for the row counts it multiplies
    (`prepack_linears`), which the jitted forward reads through `reading_packed_linears`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_impl.generation import generate
    from flax_impl.layers.attention import set_attn_implementation
    from flax_impl.layers.linear import linear_packs, prepack_linears, reading_packed_linears

    set_attn_implementation(model, attn)
    graphdef, state = nnx.split(model)

    def logits(s, packs, i):
        merged = nnx.merge(graphdef, s)
        with reading_packed_linears(merged, packs):
            return merged(i).logits

    run_forward = jax.jit(logits)

    def forward(ids):
        j = jnp.asarray(ids)
        if packed:
            prepack_linears(model, (ids.size,))
        packs = linear_packs(model)
        return lambda: run_forward(state, packs, j).block_until_ready()

    def decode(ids, new):
        j = jnp.asarray(ids)
        if packed:  # the decode steps' one row per sequence, and the prompt pass
            prepack_linears(model, (ids.shape[0], ids.size))

        def run():
            set_attn_implementation(model, attn)
            return np.asarray(generate(model, j, max_new_tokens=new))
        return run

    if packed:
        return System("Flax twin (packed)", forward, decode, key="flax-packed")
    return System("Flax twin" + (" (fast)" if attn == "fast" else ""), forward, decode,
                  key="flax-fast" if attn == "fast" else "flax")


def _hf_flax(config, state: dict) -> tuple[System | None, str]:
    """HF's Flax `FlaxLlamaForCausalLM` (transformers 4.x) on the torch twin's float32 tensors, or
    None and why not. Both workloads run jitted whole, as HF's Flax docs advise (`generate` included:
    its greedy loop is then one `lax.while_loop`, like the Flax twin's)."""
    try:
        from transformers import FlaxLlamaForCausalLM  # removed in transformers 5
    except ImportError:
        try:
            import transformers
        except ImportError as e:
            return None, f"HF Flax not measured: transformers does not import ({e})"
        return None, (f"HF Flax not measured: transformers {transformers.__version__} has no Flax models "
                      "(they were removed in v5): `pip install --no-deps --target DIR 'transformers==4.57.*' "
                      "'huggingface_hub<1.0' 'tokenizers<0.23' requests`, then run with PYTHONPATH=DIR:.")
    import jax
    import jax.numpy as jnp

    model = FlaxLlamaForCausalLM(_llama_config(config), _do_init=False, dtype=jnp.float32)
    # HF's Flax names are the torch names, with `kernel` ([in, out]) for a linear's weight and
    # `embedding` for the embedding table.
    params: dict = {}
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        value = tensor.detach().numpy()
        if path[-1] == "embed_tokens":
            leaf = "embedding"
        elif value.ndim == 2:
            leaf, value = "kernel", value.T
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)
    # No end-of-sequence stop, as for every other system: HF Flax takes no eos of None, so it gets
    # an id past the vocabulary, which no step can produce.
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = config.vocab_size, 0
    run_forward = jax.jit(lambda p, i: model(i, params=p).logits)

    def forward(ids):
        j = jnp.asarray(ids, jnp.int32)  # HF's generate writes int32 token ids into the prompt's array
        return lambda: run_forward(params, j).block_until_ready()

    def decode(ids, new):
        j = jnp.asarray(ids, jnp.int32)
        run = jax.jit(lambda p, i: model.generate(i, params=p, max_new_tokens=new, do_sample=False).sequences)
        return lambda: np.asarray(run(params, j))

    return System("HF Flax", forward, decode, key="hf-flax"), ""


# ---- building the three models on the same weights ------------------------------------------------

def _hf_systems(config, state: dict, device: str, dtype, keys: set[str]) -> tuple[list[System], str]:
    """The HF torch systems `keys` names ("hf", "hf-static"), or none and why not (transformers
    missing: the twins are measured alone)."""
    wanted_keys = [k for k in ("hf", "hf-static") if k in keys]
    if not wanted_keys:
        return [], ""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return [], f"HF torch not measured: transformers does not import ({e}); the twins' figures stand alone"
    return [_hf_torch(config, state, device, dtype, static_compile=(k == "hf-static")) for k in wanted_keys], ""


def _build_cpu(keys: set[str]):
    """(config, HF systems, torch twins, Flax twins, notes on HF systems not measured) on the
    mid-size float32 model, same weights; each twin eager and with fast attention, the torch twin
    also compiled and on packed linears; HF Flax where transformers 4.x is installed."""
    import torch

    import torch_impl
    from parity.bench.generation import build

    config, torch_model, _ = build("torch")
    state = dict(torch_model.state_dict())
    twins = [_torch_twin(torch_model, "cpu", attn) for attn in ("eager", "fast")]
    twins = [t for t in twins + [_torch_twin(torch_model, "cpu", compile=True)] if t.key in keys]
    if "torch-packed" in keys:
        with torch.device("meta"):
            packed_model = torch_impl.ForCausalLM(config, dtype=torch.float32)
        packed_model.load_state_dict(state, strict=True, assign=True)  # the same tensors, its own packs
        twins.append(_torch_twin(packed_model.eval(), "cpu", packed=True))
    flaxes = []
    if keys & {"flax", "flax-fast", "flax-packed"}:
        _, flax_model, _ = build("flax")
        flaxes = [f for f in (_flax_twin(flax_model, attn) for attn in ("eager", "fast")) if f.key in keys]
    if "flax-packed" in keys:  # the same arrays in a module of its own: its own packs
        from flax import nnx

        flaxes.append(_flax_twin(nnx.merge(*nnx.split(flax_model)), packed=True))
    hfs, note = _hf_systems(config, state, "cpu", torch.float32, keys - {"hf-static"})  # static: GPU only
    flax_note = ""
    if "hf-flax" in keys:
        hf_flax, flax_note = _hf_flax(config, state)
        hfs += [hf_flax] if hf_flax is not None else []
    return config, hfs, twins, flaxes, [n for n in (note, flax_note) if n]


def _build_gpu(keys: set[str]):
    """(config, HF systems, torch twins, Flax twins, notes) on the 1.1 B shape in bf16, random
    normal(0, 0.02) weights made on the device."""
    import torch

    import torch_impl
    from parity.bench.checkpoints import TINYLLAMA
    from weights.config import ModelConfig

    config = ModelConfig(**TINYLLAMA)
    with torch.device("meta"):
        model = torch_impl.ForCausalLM(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cuda").eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # HF's init: normal(0, 0.02) matrices, unit norm scales
            if p.dim() == 2:
                p.normal_(0.0, config.initializer_range, generator=gen)
            else:
                p.fill_(1.0)
    state = dict(model.state_dict())
    hfs, hf_note = _hf_systems(config, state, "cuda", torch.bfloat16, keys)
    twins = [_torch_twin(model, "cuda", attn) for attn in ("eager", "fast")]
    twins = [t for t in twins + [_torch_twin(model, "cuda", compile=True)] if t.key in keys]
    flaxes, note = [], ""
    if keys & {"flax", "flax-fast"}:
        try:
            flaxes, note = _flax_on_gpu(config, model)
        except Exception as e:  # a bench reports what it could not measure, and measures the rest
            note = f"Flax twin not measured on the GPU: {type(e).__name__}: {str(e).splitlines()[0]}"
        flaxes = [f for f in flaxes if f.key in keys]
    return config, hfs, twins, flaxes, [n for n in (hf_note, note) if n]


def _flax_on_gpu(config, torch_model):
    """The Flax twin on the first JAX GPU with the torch twin's weights, or (None, why not)."""
    try:
        import jax

        gpus = jax.devices("gpu")
    except RuntimeError as e:
        return [], f"Flax twin not measured on the GPU: JAX has no GPU backend here ({str(e).splitlines()[0]})"
    import jax.numpy as jnp
    import ml_dtypes
    import torch
    from flax import nnx

    import flax_impl
    from weights.names import hf_name, is_transposed

    with jax.default_device(gpus[0]):
        model = nnx.eval_shape(lambda: flax_impl.ForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
        state = torch_model.state_dict()
        for path, var in nnx.to_flat_state(nnx.state(model)):
            name = hf_name(path)
            t = state[name]
            t = t.T if is_transposed(name) else t
            host = t.contiguous().view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
            var.set_value(jax.device_put(host, gpus[0]))
    return [_flax_twin(model, attn) for attn in ("eager", "fast")], ""


# ---- the section -----------------------------------------------------------------------------------

def _spinner() -> subprocess.Popen:
    """A child process that keeps one core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _progress(label: str, times: dict[str, list[float]]) -> None:
    """One stderr line per workload: the table comes only at the end of a long run."""
    each = ", ".join(f"{n} {statistics.median(v) * 1e3:.1f} ms" for n, v in times.items())
    print(f"side_by_side: {label}: {each}", file=sys.stderr, flush=True)


def _repeats() -> int:
    return max(1, int(os.environ.get("TWINLM_BENCH_REPEAT", "3")))


def _same_tokens(results: dict[str, Any], name: str, reference: str) -> str:
    """How many rows of `name`'s last greedy output equal `reference`'s, and the first step
    where one differs."""
    a, b = (np.asarray(results[n].cpu() if hasattr(results[n], "cpu") else results[n]) for n in (name, reference))
    same = (a == b).all(axis=1)
    if same.all():
        return f"identical ({a.shape[0]} rows x {a.shape[1]} tokens)"
    first = int(np.argmax((a != b).any(axis=0)))
    return f"{int(same.sum())} of {a.shape[0]} rows identical; first difference at position {first}"


def _cpu_rows() -> list[Row]:
    keys = selected_systems()
    config, hfs, twins, flaxes, notes = _build_cpu(keys)
    hf = next((s for s in hfs if s.key == "hf"), None)
    hf_flax = next((s for s in hfs if s.key == "hf-flax"), None)
    systems = [*hfs, *twins, *flaxes]
    rng = np.random.default_rng(0)
    workloads = [(f"forward {b}x{t}", "forward", rng.integers(0, config.vocab_size, (b, t)), None)
                 for b, t in CPU_FORWARD]
    workloads += [(f"greedy decode b{b}, {CPU_NEW} new", "decode", rng.integers(0, config.vocab_size, (b, CPU_PROMPT)),
                   CPU_NEW) for b in CPU_BATCHES]
    rows = [Row("side_by_side", "device, model",
                f"cpu ({os.cpu_count()} CPUs), mid-size LLaMA {config.num_hidden_layers} layers float32, "
                f"{_repeats()} interleaved rounds, median of per-round ratios; systems: "
                + ", ".join(s.name for s in systems))]
    rows += [Row("side_by_side", "HF not measured", note) for note in notes]
    for busy in (False, True):
        tag = "1 core kept busy" if busy else "as is"
        chosen = [w for w in workloads if wanted(f"{w[0]} ({tag})")]
        if not chosen:
            continue
        spinner = _spinner() if busy else None
        try:
            if spinner is not None:
                time.sleep(0.5)
            load = os.getloadavg()[0]
            for label, kind, ids, new in chosen:
                runs = [s for s in systems if kind == "decode" or s.forward is not None]
                calls = {s.name: (s.forward(ids) if kind == "forward" else s.decode(ids, new)) for s in runs}
                results: dict[str, Any] = {}
                times = interleaved(calls, {s.name: s.sync for s in runs}, _repeats(), results=results)
                _progress(f"{label} ({tag})", times)
                ms = ", ".join(f"{n} {min(t) * 1e3:.0f} ms" for n, t in times.items())
                rows.append(Row("side_by_side", f"{label} ({tag}): best of each", ms))
                goal = GOALS[("torch", kind)]
                for twin in (t for t in runs if t in twins and hf is not None):
                    r = ratio(times, twin.name, hf.name)
                    rows.append(Row("side_by_side", f"{label} ({tag}): {twin.name} / HF torch", f"{r:.2f}",
                                    f"<= {goal:.2f}", r <= goal))
                for flax in (f for f in runs if f in flaxes):
                    if hf_flax is not None:
                        r, goal = ratio(times, flax.name, hf_flax.name), GOALS[("flax", kind)]
                        rows.append(Row("side_by_side", f"{label} ({tag}): {flax.name} / HF Flax", f"{r:.2f}",
                                        f"<= {goal:.2f}", r <= goal))
                    if hf is not None:
                        r = ratio(times, flax.name, hf.name)
                        rows.append(Row("side_by_side", f"{label} ({tag}): {flax.name} / HF torch", f"{r:.2f}"))
                rows += _compiled_rows(f"{label} ({tag})", times, results, twins + flaxes)
            rows.append(Row("side_by_side", f"load average ({tag})", f"{load:.1f} / {os.getloadavg()[0]:.1f}"))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    return rows


def _compiled_rows(label: str, times: dict[str, list[float]], results: dict[str, Any], twins: list[System]
                   ) -> list[Row]:
    """The compiled and packed twins against their eager one: speed-up, and (decode) whether the
    tokens agree."""
    names, rows = {t.key: t.name for t in twins}, []
    for eager_key, key in (("torch", "torch-compiled"), ("torch", "torch-packed"), ("flax", "flax-packed")):
        eager, other = names.get(eager_key), names.get(key)
        if eager is None or other is None or other not in times or eager not in times:
            continue
        rows.append(Row("side_by_side", f"{label}: {other} / {eager}", f"{ratio(times, other, eager):.2f}"))
        if "decode" in label:
            rows.append(Row("side_by_side", f"{label}: {other} tokens vs {eager}", _same_tokens(results, other, eager)))
    return rows


def _compile_counters() -> str:
    """Dynamo's graph count and Inductor's CUDA-graph skips so far (a skipped CUDA graph means
    the compiled step ran without one)."""
    from torch._dynamo.utils import counters

    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    return f"{counters['stats']['unique_graphs']} graphs compiled, {skips} CUDA-graph skips"


def _gpu_rows() -> list[Row]:
    # JAX would otherwise reserve 75% of the device at its first array, beside torch's models.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import torch

    if not torch.cuda.is_available():
        return [Row("side_by_side", "device cuda", f"not measured: torch {torch.__version__} sees no CUDA device "
                    "(a CPU-only build, or no GPU visible)", "", False)]
    keys = selected_systems()
    config, hfs, twins, flaxes, notes = _build_gpu(keys)
    hf = next((s for s in hfs if s.key == "hf"), None)
    systems = [*hfs, *twins, *flaxes]
    # A step reads every weight once but the input embedding table (it gathers B rows of it).
    step_bytes = 2 * (sum(hf_shapes_numel(config)) - config.vocab_size * config.hidden_size)
    bandwidth = _device_bandwidth()
    bound = bandwidth / step_bytes  # steps/s
    rows = [Row("side_by_side", "device, model", f"{torch.cuda.get_device_name()}, 1.1B shape bf16; "
                f"copy bandwidth {bandwidth / 1e12:.2f} TB/s -> b1 bound {bound:.0f} tok/s; torch {torch.__version__}; "
                "systems: " + ", ".join(s.name for s in systems))]
    rows += [Row("side_by_side", "not measured", n) for n in notes]
    rng = np.random.default_rng(0)
    for flax in flaxes:
        ids = rng.integers(0, config.vocab_size, (1, GPU_PROMPT))
        t0 = time.perf_counter()
        flax.decode(ids, GPU_NEW)()
        first = time.perf_counter() - t0
        print(f"side_by_side: {flax.name} first generate call {first:.1f} s", file=sys.stderr, flush=True)
        rows.append(Row("side_by_side", f"{flax.name}: first generate call (compile + run)", f"{first:.1f} s",
                        "<= 3 s", first <= 3.0))
    for b, t in GPU_FORWARD:
        label = f"forward {b}x{t}"
        if not wanted(label):
            continue
        ids = rng.integers(0, config.vocab_size, (b, t))
        runs = [s for s in systems if s.forward is not None and s.key != "hf-static"]
        calls = {s.name: s.forward(ids) for s in runs}
        times = interleaved(calls, {s.name: s.sync for s in runs}, _repeats(), warmup=2)
        _progress(label, times)
        ms = ", ".join(f"{n} {statistics.median(v) * 1e3:.1f} ms" for n, v in times.items())
        rows.append(Row("side_by_side", f"{label}: median of each", ms))
        for twin in (t for t in runs if t in twins and hf is not None):
            r = ratio(times, twin.name, hf.name)
            rows.append(Row("side_by_side", f"{label}: {twin.name} / HF torch", f"{r:.2f}", "<= 1.00", r <= 1.0))
    rates = {}
    for b in GPU_BATCHES:
        label = f"decode b{b}"
        if not wanted(label):
            continue
        ids = rng.integers(0, config.vocab_size, (b, GPU_PROMPT))
        calls = {}
        for s in list(systems):  # the first call of a compiled system (its compilation) reported on its own
            call = calls[s.name] = s.decode(ids, GPU_NEW)
            if s.key in ("hf-static", "torch-compiled"):
                t0 = time.perf_counter()
                try:
                    call()
                    s.sync()
                except Exception as e:  # report it and measure the other systems
                    rows.append(Row("side_by_side", f"{s.name}: not measured", f"{type(e).__name__}: "
                                    f"{(str(e).strip().splitlines() or [''])[0][:300]}", "", False))
                    systems.remove(s)
                    del calls[s.name]
                    continue
                first = time.perf_counter() - t0
                print(f"side_by_side: {s.name} b{b} first call (compile + run) {first:.1f} s", file=sys.stderr,
                      flush=True)
                rows.append(Row("side_by_side", f"{label}: {s.name} first call (compile + run)", f"{first:.1f} s"))
        results: dict[str, Any] = {}
        times = interleaved(calls, {s.name: s.sync for s in systems}, _repeats(), warmup=1, results=results)
        _progress(label, times)
        for name, v in times.items():
            rates[(name, b)] = b * GPU_NEW / statistics.median(v)
        rows.append(Row("side_by_side", f"{label}, tok/s", ", ".join(f"{n} {rates[(n, b)]:.0f}" for n in times)))
        rows += _compiled_rows(label, times, results, twins)
    if any(t.key == "torch-compiled" for t in systems):
        rows.append(Row("side_by_side", "compiled systems (all of them): Dynamo / Inductor", _compile_counters()))
    for s, goal in [(twin, 0.40) for twin in twins if twin in systems] + [(flax, 0.60) for flax in flaxes]:
        if (s.name, 1) in rates:
            b1 = rates[(s.name, 1)]
            rows.append(Row("side_by_side", f"{s.name} decode b1 / bound", f"{b1 / bound:.0%} ({b1:.0f} tok/s)",
                            f">= {goal:.0%}", b1 / bound >= goal))
        if (s.name, 1) in rates and (s.name, 8) in rates:
            b8 = rates[(s.name, 8)]
            rows.append(Row("side_by_side", f"{s.name} decode b8 / b1", f"{b8 / b1:.1f}x", ">= 4x", b8 / b1 >= 4))
    return rows


def hf_shapes_numel(config) -> list[int]:
    """Element counts of every parameter of the causal LM."""
    from weights.names import hf_shapes

    return [int(np.prod(shape)) for shape in hf_shapes(config, "causal_lm").values()]


def _device_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), best of 5."""
    import torch

    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


@section("side_by_side")
def bench_side_by_side() -> list[Row]:
    """HF transformers torch (sdpa) against both twins, one process, interleaved (see the module doc)."""
    return _gpu_rows() if options().device == "cuda" else _cpu_rows()
