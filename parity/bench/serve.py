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
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from parity.bench import Row, run_child, section

__all__ = ["GOAL", "RATE", "SLOTS", "bench_serve", "run_trace", "trace"]

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


def continuous(twin: str, model, reqs: list[dict]) -> dict:
    """The trace through the twin's `Runner` in real time."""
    from weights.shared.serving import Request

    if twin == "torch":
        from torch_impl.serving import Runner
    else:
        from flax_impl.serving import Runner
    max_len = max(BUCKETS) + OUTPUT_LENGTHS[1]
    t0 = time.perf_counter()
    runner = Runner(model, SLOTS, max_len, BUCKETS)
    build = time.perf_counter() - t0
    list(runner.run([Request(r["prompt"], max_new_tokens=2) for r in reqs[:SLOTS]]))  # warm-up, untimed
    warm = time.perf_counter() - t0 - build
    ids, finish, pending = {}, [0.0] * len(reqs), list(range(len(reqs)))
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
    out = _figures(reqs, finish, max(finish))
    out["build"], out["warm"] = build, warm
    return out


def static(twin: str, model, reqs: list[dict]) -> dict:
    """The trace through `generate()` on fixed batches of `SLOTS`, in real time."""
    batches = [list(range(i, min(i + SLOTS, len(reqs)))) for i in range(0, len(reqs), SLOTS)]

    def inputs(batch: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
        p = max(len(reqs[i]["prompt"]) for i in batch)
        ids = np.zeros((len(batch), p), np.int64)
        mask = np.zeros((len(batch), p), np.int64)
        for row, i in enumerate(batch):
            prompt = reqs[i]["prompt"]
            ids[row, p - len(prompt):], mask[row, p - len(prompt):] = prompt, 1
        return ids, mask, max(reqs[i]["new"] for i in batch)

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
        for batch in batches:  # compile (and warm) every batch shape before the clock starts
            run(*inputs(batch))
    else:
        run(*inputs(batches[0])[:2], 2)  # warm-up, untimed
    warm = time.perf_counter() - t0
    finish = [0.0] * len(reqs)
    start = time.perf_counter()
    for batch in batches:
        ready = reqs[batch[-1]]["arrival"]
        now = time.perf_counter() - start
        if now < ready:
            time.sleep(ready - now)
        run(*inputs(batch))
        now = time.perf_counter() - start
        for i in batch:
            finish[i] = now
    out = _figures(reqs, finish, max(finish))
    out["warm"] = warm
    return out


def run_trace(twin: str) -> dict:
    """Both modes of one twin on the trace (run in a child process by `bench_serve`)."""
    from parity.bench.generation import build

    _, model, _ = build(twin)
    reqs = trace()
    out: dict[str, Any] = {"twin": twin, "continuous": continuous(twin, model, reqs), "static": static(twin, model, reqs),
                           "load": os.getloadavg()[0]}
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
    rows = [Row("serve", f"trace: {NUM_REQUESTS} requests, Poisson {RATE:g}/s over {reqs[-1]['arrival']:.1f} s, "
                         f"prompts {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]}, outputs {OUTPUT_LENGTHS[0]}-"
                         f"{OUTPUT_LENGTHS[1]} tokens ({tokens} in all), {SLOTS} slots = static batch size", "")]
    for twin in ("torch", "flax"):
        r = _child(twin)
        c, s = r["continuous"], r["static"]
        for mode, m in (("continuous", c), ("static", s)):
            build = f"; runner compile {m['build']:.1f} s" if twin == "flax" and mode == "continuous" else ""
            build += f"; warm-up {m['warm']:.1f} s" + (" (compiles every batch shape)" if twin == "flax" and
                                                       mode == "static" else "")
            rows.append(Row("serve", f"{twin} {mode}",
                            f"{m['tokens_per_s']:.1f} tok/s ({m['seconds']:.1f} s), per-token latency p50 "
                            f"{m['p50'] * 1e3:.0f} ms, p99 {m['p99'] * 1e3:.0f} ms{build}"))
        ratio = c["tokens_per_s"] / s["tokens_per_s"]
        rows.append(Row("serve", f"{twin} continuous / static throughput (load {r['load']:.1f})", f"{ratio:.2f}x",
                        f">= {GOAL}x", ratio >= GOAL))
    return rows
