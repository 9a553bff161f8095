"""The `serve` section of `make bench`: continuous batching (the serving `Runner`) against static
batching (`generate()` on fixed batches) on one Poisson arrival trace, in each twin.

The trace (`trace`): 64 requests, arrivals a Poisson process of `RATE` requests per second,
prompt lengths uniform in [4, 64] and output lengths uniform in [4, 128] tokens (greedy, no eos:
each request asks for exactly its length), seeded. The model is the mid-size random LLaMA of
the decode bench (`parity.bench.generation.build`), float32, one child process per twin.

- continuous: a `Runner` with `SLOTS` slots; requests are submitted when the wall clock passes
  their arrival, and the loop steps whenever anything is queued or running.
- static: the requests, in arrival order, in fixed batches of `SLOTS`; a batch starts when its
  last request has arrived and the previous batch is done, and runs `generate()` on its
  left-padded prompts for the batch's longest output (a batch cannot end a row early), with
  `return_scores=True`, so that both modes deliver the same: each token, its log-prob and the
  top-8 candidates.

Both count only the tokens each request asked for. Throughput is those tokens over the time
from the first arrival to the last completion. Per-token latency is per request: (completion -
arrival) / its tokens, then p50 / p99 over the 64 requests (static batching streams nothing, so
a request's tokens are only delivered when its batch ends). Both modes are timed warm, in both
twins: the Flax runner compiles at construction, and every Flax static batch shape is run once
before the clock (that is its static warm-up); the runner, in both twins, runs the first `SLOTS`
prompts for 2 tokens each (a batched prefill and decode steps), and torch's static mode the
first batch for 2 tokens, before their clocks start, since the first eager torch calls pay for
allocations and kernel set-up that the timed steps then reuse.

Where the continuous pass's time went comes from the runner's own `stats` (its decode steps and
prefill calls, each timed): the section reports both, and static time over continuous decode
time, the ratio continuous batching would reach if every prefill were free. With the trace's
decode-step counts (static batching's against the fewest a full runner can take) it bounds
what the goal can expect on this trace.

The two modes alternate: `TWINLM_BENCH_REPEAT` (default 3) repetitions of the pair, the first
continuous then static, the next static then continuous, and so on, on one built runner and one
warmed `generate()`. Each repetition's ratio compares two passes run back to back, under about
the same load (on a shared machine the load moves within minutes); the section reports the
median ratio, each repetition's ratio and the load average after each pass, and the median of
each mode's figures.

`TWINLM_BENCH_PACK` (a comma list of row counts, e.g. "8"; default none) packs the torch twin's
linears for those row counts (`prepack_linears`) before both modes run, so they share the packs:
"8" speeds up every full decode step of the runner and of static batching alike. The Flax twin
runs as it is: its packed copies make 8-row steps slower (1.08x, README "Side by side").
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from parity.bench import Row, run_child, section

__all__ = ["GOAL", "RATE", "SLOTS", "bench_serve", "build_runner", "continuous", "packed_rows", "repeats",
           "run_trace", "static", "static_generate", "trace"]

NUM_REQUESTS, RATE, SLOTS = 64, 4.0, 8
PROMPT_LENGTHS, OUTPUT_LENGTHS = (4, 64), (4, 128)
# Prefill runs at the bucket's length, so coarse buckets waste prefill work (a 33-token prompt
# padded to 64 costs twice its own); 8-token steps keep the waste under 8 tokens a prompt, at
# the price of more Flax programs (compiled before the clock starts).
BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64)
GOAL = 1.5  # continuous / static throughput, both twins


def trace(seed: int = 0) -> list[dict]:
    """The requests: arrival time (s), prompt token ids, output length; sorted by arrival."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / RATE, NUM_REQUESTS))
    arrivals -= arrivals[0]
    out = []
    for t in arrivals:
        p = int(rng.integers(PROMPT_LENGTHS[0], PROMPT_LENGTHS[1] + 1))
        out.append(dict(arrival=float(t), prompt=rng.integers(3, 32000, p).tolist(),
                        new=int(rng.integers(OUTPUT_LENGTHS[0], OUTPUT_LENGTHS[1] + 1))))
    return out


def _figures(reqs: list[dict], finish: list[float], makespan: float) -> dict:
    tokens = sum(r["new"] for r in reqs)
    per_token = np.array([(f - r["arrival"]) / r["new"] for r, f in zip(reqs, finish)])
    return dict(tokens=tokens, seconds=makespan, tokens_per_s=tokens / makespan,
                p50=float(np.percentile(per_token, 50)), p99=float(np.percentile(per_token, 99)))


def build_runner(twin: str, model, reqs: list[dict]) -> tuple[Any, dict]:
    """The twin's `Runner`, built (the Flax one compiles every program) and warmed: it serves the
    trace's first `SLOTS` prompts for 2 tokens. Returns it and the seconds both took."""
    from weights.shared.serving import Request

    if twin == "torch":
        from torch_impl.serving import Runner
    else:
        from flax_impl.serving import Runner
    max_len = max(BUCKETS) + OUTPUT_LENGTHS[1]
    t0 = time.perf_counter()
    out = Runner(model, SLOTS, max_len, BUCKETS)
    build = time.perf_counter() - t0
    list(out.run([Request(r["prompt"], max_new_tokens=2) for r in reqs[:SLOTS]]))  # warm-up, untimed
    return out, dict(build=build, warm=time.perf_counter() - t0 - build)


def continuous(runner, reqs: list[dict]) -> dict:
    """The trace through a built `Runner` in real time."""
    from weights.shared.serving import Request

    ids, finish, pending = {}, [0.0] * len(reqs), list(range(len(reqs)))
    runner.stats.reset()
    start = time.perf_counter()
    while pending or not runner.scheduler.idle():
        now = time.perf_counter() - start
        while pending and reqs[pending[0]]["arrival"] <= now:
            i = pending.pop(0)
            ids[runner.submit(Request(reqs[i]["prompt"], max_new_tokens=reqs[i]["new"]))] = i
        if runner.scheduler.idle():
            time.sleep(max(0.0, reqs[pending[0]]["arrival"] - now))
            continue
        runner.step()
        now = time.perf_counter() - start
        for rid in list(ids):
            if rid in runner.scheduler.done:
                finish[ids.pop(rid)] = now
    stats = runner.stats
    return dict(_figures(reqs, finish, max(finish)), decode_steps=stats.decode_steps,
                decode_seconds=stats.decode_seconds, prefills=stats.prefills, prefill_seconds=stats.prefill_seconds)


def _batches(reqs: list[dict]) -> list[list[int]]:
    return [list(range(i, min(i + SLOTS, len(reqs)))) for i in range(0, len(reqs), SLOTS)]


def _batch_inputs(reqs: list[dict], batch: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    p = max(len(reqs[i]["prompt"]) for i in batch)
    ids = np.zeros((len(batch), p), np.int64)
    mask = np.zeros((len(batch), p), np.int64)
    for row, i in enumerate(batch):
        prompt = reqs[i]["prompt"]
        ids[row, p - len(prompt):], mask[row, p - len(prompt):] = prompt, 1
    return ids, mask, max(reqs[i]["new"] for i in batch)


def static_generate(twin: str, model, reqs: list[dict]) -> tuple[Callable[..., object], dict]:
    """`generate()` on one fixed batch `(ids, mask, max_new_tokens)`, warmed: Flax runs every batch
    shape of the trace once (which compiles it), torch the first batch for 2 tokens. Returns the
    function and the warm-up seconds."""
    if twin == "torch":
        import torch

        from torch_impl.generation import generate

        run = lambda ids, mask, n: generate(model, torch.from_numpy(ids), torch.from_numpy(mask), max_new_tokens=n,  # noqa: E731
                                            return_scores=True)
    else:
        import jax
        import jax.numpy as jnp

        from flax_impl.generation import generate

        run = lambda ids, mask, n: jax.block_until_ready(generate(  # noqa: E731
            model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=n, return_scores=True))
    t0 = time.perf_counter()
    if twin == "flax":
        for batch in _batches(reqs):  # compile (and warm) every batch shape before the clock starts
            run(*_batch_inputs(reqs, batch))
    else:
        run(*_batch_inputs(reqs, _batches(reqs)[0])[:2], 2)  # warm-up, untimed
    return run, dict(warm=time.perf_counter() - t0)


def static(run: Callable[..., object], reqs: list[dict]) -> dict:
    """The trace through `generate()` (`run`, from `static_generate`) on fixed batches of `SLOTS`,
    in real time."""
    finish = [0.0] * len(reqs)
    start = time.perf_counter()
    for batch in _batches(reqs):
        ready = reqs[batch[-1]]["arrival"]
        now = time.perf_counter() - start
        if now < ready:
            time.sleep(ready - now)
        run(*_batch_inputs(reqs, batch))
        now = time.perf_counter() - start
        for i in batch:
            finish[i] = now
    return _figures(reqs, finish, max(finish))


def repeats() -> int:
    """Repetitions of the (continuous, static) pair: `TWINLM_BENCH_REPEAT`, default 3."""
    return max(1, int(os.environ.get("TWINLM_BENCH_REPEAT", "3")))


def packed_rows() -> tuple[int, ...]:
    """The row counts `TWINLM_BENCH_PACK` names for the torch twin's packed linears (default none)."""
    value = os.environ.get("TWINLM_BENCH_PACK", "")
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"TWINLM_BENCH_PACK: expected row counts such as 8 or 4,8; got {value!r}") from None


def run_trace(twin: str, repeat: int | None = None) -> dict:
    """Both modes of one twin on the trace, `repeat` times, alternating which goes first (run in
    a child process by `bench_serve`). Each repetition's ratio compares two passes run back to
    back, under about the same load; the section reports the median."""
    from parity.bench.generation import build

    _, model, _ = build(twin)
    rows = packed_rows() if twin == "torch" else ()
    if rows:
        from torch_impl.layers.linear import prepack_linears

        prepack_linears(model, rows)
    reqs = trace()
    serving, setup = build_runner(twin, model, reqs)
    run, static_setup = static_generate(twin, model, reqs)
    reps = []
    for i in range(repeats() if repeat is None else repeat):
        rep: dict[str, Any] = {}
        for mode in ("continuous", "static") if i % 2 == 0 else ("static", "continuous"):
            rep[mode] = continuous(serving, reqs) if mode == "continuous" else static(run, reqs)
            rep[mode]["load"] = os.getloadavg()[0]
        rep["ratio"] = rep["continuous"]["tokens_per_s"] / rep["static"]["tokens_per_s"]
        reps.append(rep)
    out: dict[str, Any] = {"twin": twin, "repeats": reps, "continuous_setup": setup, "static_setup": static_setup,
                           "packed": list(rows)}
    if twin == "torch":
        import torch

        out["threads"] = torch.get_num_threads()
    return out


def _child(twin: str) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if twin == "torch" else dict(os.environ)
    code = f"import json; from parity.bench.serve import run_trace; print(json.dumps(run_trace({twin!r})))"
    return run_child(code, env, f"{twin} serve benchmark child")


@section("serve")
def bench_serve() -> list[Row]:
    """Continuous vs static batching on a Poisson trace of 64 requests (mid-size model, float32)."""
    reqs = trace()
    tokens = sum(r["new"] for r in reqs)
    # Each request's first token comes from its prefill; a static batch then decodes for its
    # longest output, a full runner for the tokens left over every slot.
    static_steps = sum(max(reqs[i]["new"] for i in batch) - 1 for batch in _batches(reqs))
    fewest_steps = -(-(tokens - len(reqs)) // SLOTS)
    rows = [Row("serve", f"trace: {NUM_REQUESTS} requests, Poisson {RATE:g}/s over {reqs[-1]['arrival']:.1f} s, "
                         f"prompts {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]}, outputs {OUTPUT_LENGTHS[0]}-"
                         f"{OUTPUT_LENGTHS[1]} tokens ({tokens} in all), {SLOTS} slots = static batch size", ""),
            Row("serve", "decode steps: static batching's / the fewest continuous batching can take",
                f"{static_steps} / {fewest_steps} = {static_steps / fewest_steps:.2f}x")]
    if packed_rows():
        rows.append(Row("serve", "TWINLM_BENCH_PACK", f"torch linears packed for {', '.join(map(str, packed_rows()))} "
                                                      "rows in both modes; the Flax twin as it is"))
    for twin in ("torch", "flax"):
        r = _child(twin)
        reps = r["repeats"]
        for mode in ("continuous", "static"):
            med = {k: float(np.median([rep[mode][k] for rep in reps]))
                   for k in ("tokens_per_s", "seconds", "p50", "p99")}
            setup = r[f"{mode}_setup"]
            note = f"; runner compile {setup['build']:.1f} s" if twin == "flax" and mode == "continuous" else ""
            note += f"; warm-up {setup['warm']:.1f} s" + (" (compiles every batch shape)" if twin == "flax" and
                                                         mode == "static" else "")
            rows.append(Row("serve", f"{twin} {mode} (median of {len(reps)})",
                            f"{med['tokens_per_s']:.1f} tok/s ({med['seconds']:.1f} s), per-token latency p50 "
                            f"{med['p50'] * 1e3:.0f} ms, p99 {med['p99'] * 1e3:.0f} ms{note}"))
        ratios = [rep["ratio"] for rep in reps]
        ratio = float(np.median(ratios))
        each = ", ".join(f"{x:.2f}x" for x in ratios)
        loads = ", ".join(f"{rep[m]['load']:.1f}" for rep in reps for m in ("continuous", "static"))
        split = {k: float(np.median([rep["continuous"][k] for rep in reps]))
                 for k in ("decode_steps", "decode_seconds", "prefills", "prefill_seconds")}
        free = float(np.median([rep["static"]["seconds"] / rep["continuous"]["decode_seconds"] for rep in reps]))
        rows.append(Row("serve", f"{twin} continuous pass, median: decode steps / prefill calls; the ratio if "
                                 "every prefill were free (static time / continuous decode time)",
                        f"{split['decode_steps']:.0f} steps {split['decode_seconds']:.1f} s "
                        f"({split['decode_seconds'] / split['decode_steps'] * 1e3:.0f} ms) / {split['prefills']:.0f} "
                        f"prefills {split['prefill_seconds']:.1f} s; {free:.2f}x"))
        rows.append(Row("serve", f"{twin} continuous / static throughput, median of {each} (loads {loads})",
                        f"{ratio:.2f}x", f">= {GOAL}x", ratio >= GOAL))
    return rows
