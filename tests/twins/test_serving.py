"""The serving `Runner` of both twins: staggered admissions give every request exactly the tokens
of `generate()` on that request alone, the twins' runners stream identical tokens, a reused slot
keeps nothing of its previous request, and a new prompt length within a pad bucket compiles
nothing.

The model has every switch the cache change must keep working: experts (Grok-1 routing),
attention and final soft-caps, sandwich norms, and a sliding window on every other layer,
short enough to bite. The runners are built once per slot count and reused across hypothesis
examples (so every example after the first also runs in slots freed by earlier requests); the
Flax twin compiles each runner's programs once.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import flax_impl.layers.linear as f_linear
import flax_impl.serving as fs
import torch_impl.layers.linear as t_linear
import torch_impl.serving as ts
from parity.tolerances import tolerance
from tests.helpers.generation import twin_pair
from tests.helpers.twins import spy_on_packs
from torch_impl.generation import generate as torch_generate
from weights.config import ModelConfig, RopeScaling
from weights.shared.serving import Request, RunnerStats, resolve_key_buckets, resolve_row_buckets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = ModelConfig.for_family(
    "llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, pad_token_id=0, initializer_range=0.3,
    num_local_experts=4, num_experts_per_tok=2, norm_topk_prob=False,  # Grok-1 routing
    sandwich_norm=True, attn_logit_softcapping=1.0, scale_embeddings=True, final_logit_softcapping=3.0,
    use_sliding_window=True, sliding_window=3, sliding_window_pattern=2)  # layer 0 slides, layer 1 global
BUCKETS, MAX_NEW, MAX_LEN = (8, 16), 10, 26

_PAIR = {}
_RUNNERS: dict[tuple[str, int], object] = {}
_BUILD_COMPILES: dict[tuple[str, int], int] = {}

COMPILES = []  # one entry per XLA compilation in this process (jax.monitoring)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)


def pair(dtype: str = "float64"):
    if dtype not in _PAIR:
        _PAIR[dtype] = twin_pair(CONFIG, dtype=dtype)
    return _PAIR[dtype]


def runner(twin: str, slots: int):
    """The runner of `twin` with `slots` slots, built once (Flax: compiled once) for the module."""
    if (twin, slots) not in _RUNNERS:
        t_model, f_model = pair()
        cls, model = (ts.Runner, t_model) if twin == "torch" else (fs.Runner, f_model)
        before = len(COMPILES)
        # Each Flax program costs a compilation, so the several-slot runner has two key buckets
        # (decode over 16 keys while every row fits, else all 26) and pads every prefill and
        # decode step to its 3 rows (padding rows included whenever fewer are admitted); one slot,
        # one key bucket. The torch runner, compiling nothing, also has a row bucket of 1: its
        # decode steps run slot 0 alone whenever it is the only busy one, and its streams must
        # still equal the Flax runner's and `generate()`'s.
        many = slots > 1
        rows = (1, slots) if twin == "torch" else (slots,)
        _RUNNERS[twin, slots] = cls(model, slots, MAX_LEN, BUCKETS, key_buckets=(16,) if many else (MAX_LEN,),
                                    row_buckets=rows)
        _BUILD_COMPILES[twin, slots] = len(COMPILES) - before
    return _RUNNERS[twin, slots]


@st.composite
def requests(draw, vocab: int) -> Request:
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    allowed = None
    if draw(st.booleans()):
        allowed = rng.random(vocab) < 0.4
        allowed[rng.integers(0, vocab)] = True
    return Request(prompt=[int(x) for x in rng.integers(1, vocab, draw(st.integers(1, max(BUCKETS))))],
                   max_new_tokens=draw(st.integers(1, MAX_NEW)), do_sample=draw(st.booleans()),
                   temperature=draw(st.sampled_from([0.7, 1.0, 1.8])),
                   top_k=draw(st.one_of(st.none(), st.integers(1, vocab))),
                   top_p=draw(st.one_of(st.none(), st.floats(0.05, 1.0))), allowed_tokens=allowed,
                   stop_tokens=draw(st.sampled_from([(), (int(rng.integers(0, vocab)),)])),
                   seed=draw(st.integers(0, 2**31 - 1)), filter_order=draw(st.sampled_from(["generate", "grok"])))


def drive(r, arrivals: list[tuple[int, Request]]) -> list:
    """Submit each request at its arrival step, step until all are done; every event, in order."""
    events, step = [], 0
    pending = sorted(arrivals, key=lambda a: a[0])
    while pending or not r.scheduler.idle():
        while pending and pending[0][0] <= step:
            r.submit(pending.pop(0)[1])
        events += r.step()
        step += 1
    return events


def solo(model, req: Request):
    """`generate()` on the request alone (the reference its stream must equal)."""
    out = torch_generate(model, torch.tensor([req.prompt]), max_new_tokens=req.max_new_tokens, do_sample=req.do_sample,
                         temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                         allowed_tokens=req.allowed_tokens, filter_order=req.filter_order,
                         eos_token_id=list(req.stop_tokens) or None, seed=req.seed, return_scores=True)
    return out.sequences[0, len(req.prompt):].numpy(), out.token_logprobs[0].numpy(), out.top_tokens[0].numpy()


_MASK = np.arange(CONFIG.vocab_size) % 3 != 0


# Pinned: three admissions in one step whose prompts need both pad buckets (one batched prefill
# at 16), rows growing past the 16-key decode bucket, a fourth request queued until a slot
# frees (then prefilled alone among padding rows), every filter order and knob; and one slot
# serving a queue. Hypothesis then draws fewer examples of its own.
@example(3, [(0, Request(list(range(1, 6)), max_new_tokens=10, do_sample=True, temperature=1.8, top_p=0.7,
                         allowed_tokens=_MASK, seed=5, filter_order="grok")),
             (0, Request(list(range(20, 36)), max_new_tokens=10)),
             (0, Request([7] * 12, max_new_tokens=3, do_sample=True, top_k=4, stop_tokens=(9,), seed=2)),
             (1, Request([3, 1, 4, 1, 5], max_new_tokens=10, do_sample=True, temperature=0.7, top_k=6, top_p=0.9,
                         seed=8))])
@example(1, [(0, Request([11, 12], max_new_tokens=4, do_sample=True, seed=1)),
             (0, Request(list(range(1, 17)), max_new_tokens=10, allowed_tokens=_MASK))])
@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(st.sampled_from([1, 3]), st.lists(st.tuples(st.integers(0, 6), requests(CONFIG.vocab_size)), min_size=1,
                                         max_size=5))
def test_staggered_admissions_equal_solo_generate_and_twins_agree(slots, reqs):
    t_events = drive(runner("torch", slots), reqs)
    f_events = drive(runner("flax", slots), reqs)
    # The twins stream the same tokens, for the same requests, in the same order.
    assert [(e.request_id, e.token) for e in t_events] == [(e.request_id, e.token) for e in f_events]
    tol = tolerance("float64", "logits")
    for a, b in zip(t_events, f_events):
        assert abs(a.logprob - b.logprob) <= tol
        np.testing.assert_array_equal(a.top8.ids, b.top8.ids)
        assert np.abs(a.top8.filtered_probs - b.top8.filtered_probs).max() <= tol
    first_id = t_events[0].request_id
    for i, (_, req) in enumerate(sorted(reqs, key=lambda a: a[0])):
        stream = [e for e in t_events if e.request_id == first_id + i]
        tokens, logprobs, top = solo(pair()[0], req)
        np.testing.assert_array_equal([e.token for e in stream], tokens)  # == generate() on it alone
        assert np.abs(np.array([e.logprob for e in stream]) - logprobs).max() <= tol
        np.testing.assert_array_equal(np.stack([e.top8.ids for e in stream]), top)
        if req.allowed_tokens is not None:
            assert req.allowed_tokens[tokens].all()
        filtered = np.stack([e.top8.filtered_probs for e in stream])
        assert (np.diff(filtered, axis=-1) <= 0).all() and (filtered.sum(-1) <= 1 + 1e-12).all()
        if not req.do_sample:  # greedy: the token is the best of the filtered distribution
            np.testing.assert_array_equal([e.top8.filtered_ids[0] for e in stream], tokens)


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_reused_slot_keeps_nothing_of_its_previous_request(twin):
    """Request A (long, sampled, a mask, grok order) runs in slot 0, then B in the same slot: B's
    stream, cache row, position and settings equal B's in slot 0 of another runner, and its
    tokens equal `generate()` on B alone."""
    a = Request(list(range(1, 15)), max_new_tokens=MAX_NEW, do_sample=True, temperature=1.8, top_k=5,
                allowed_tokens=np.arange(CONFIG.vocab_size) % 2 == 0, seed=3, filter_order="grok")
    b = Request([5, 6, 7], max_new_tokens=4)
    used = runner(twin, 1)
    stats = used.stats
    stats.reset()  # the runner is the module's, and earlier tests ran on it
    list(used.run([a]))
    # The runner's stats: A's one prefill of its 14 prompt tokens, then a one-row step per other token.
    assert (stats.prefills, stats.prefill_requests, stats.prefill_tokens) == (1, 1, 14)
    assert stats.decode_steps == stats.decode_rows == stats.decode_tokens == MAX_NEW - 1
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
    stats.reset()
    assert stats == RunnerStats()
    fresh_cls = ts.Runner if twin == "torch" else fs.Runner
    fresh = runner(twin, 3) if twin == "flax" else fresh_cls(pair()[0], 3, MAX_LEN, BUCKETS)
    ids = []
    for r in (used, fresh):
        ids.append(r.submit(b))
        r.step()  # admits B into slot 0, emits two tokens
    to_np = lambda x: x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)  # noqa: E731
    bucket = BUCKETS[0]
    for layer in range(CONFIG.num_hidden_layers):
        for buffers in ("keys", "values"):
            row, other = to_np(getattr(used.cache, buffers)[layer])[0], to_np(getattr(fresh.cache, buffers)[layer])[0]
            assert not row[:, bucket:].any()  # where A wrote and B did not: zeros, as in a new cache
            # B's prefill is bit-identical; the decode step's write at index 3 ran in a batch of
            # another size (1 vs 3 rows), so it may differ by rounding.
            np.testing.assert_allclose(row, other, rtol=0, atol=tolerance("float64", "activations"))
    for field in ("temperature", "top_k", "top_p", "allowed", "allowed_first", "do_sample"):
        np.testing.assert_array_equal(getattr(used.scheduler.settings, field)[0], getattr(fresh.scheduler.settings, field)[0])
    rest = lambda r: [e.token for e in r.run()]  # noqa: E731
    assert rest(used) == rest(fresh)
    assert used.result(ids[0]) == fresh.result(ids[1]) == list(solo(pair()[0], b)[0])


def test_new_prompt_length_in_a_bucket_compiles_nothing():
    """Every program is compiled when the Flax runner is built (a prefill per row count and pad
    bucket, a decode step per row count and key bucket); prompts of new lengths, admissions of 1 to 3 requests
    at once, new settings and reused slots then run without a compilation."""
    r = runner("flax", 3)
    assert r.row_buckets == (3,) and r.key_buckets == (16, MAX_LEN)
    assert _BUILD_COMPILES["flax", 3] >= len(r.row_buckets) * (len(BUCKETS) + len(r.key_buckets))
    before = len(COMPILES)
    reqs = [Request([3] * n, max_new_tokens=3, do_sample=n % 2 == 1, top_p=0.9, seed=n, filter_order="grok",
                    allowed_tokens=np.arange(CONFIG.vocab_size) != n) for n in (1, 2, 5, 8, 9, 11, 16)]
    assert len(list(r.run(reqs))) == 3 * len(reqs)
    assert len(COMPILES) == before, "a prompt length within a bucket recompiled"


@pytest.mark.parametrize("switch", ["scan_layers", pytest.param("packed", marks=pytest.mark.skipif(
    not torch.backends.mkl.is_available(), reason="the torch twin's packs are MKL's; no MKL here"))])
def test_float32_streams_equal_solo_generate(switch, monkeypatch):
    """float32: the torch runner gives every request the tokens of `generate()` on it alone, and
    the Flax runner the same tokens (so also those of the Flax `generate()`, which the generation
    tests hold equal to the torch one). Runner and solo differ only in summation order (cache
    width, batch size), and the twins by the float32 logits tolerance, so a step whose two best
    logits are closer than twice that may legitimately flip; this fixed set of requests has
    none (asserted), so every token is compared. The Flax runner here scans its layers
    (`scan_layers`: every program reads one stack of the layers' parameters, made when the runner
    is built and remade when the weights change), or both runners multiply by packed linears
    (`prepack_linears` for the decode steps' 1 and 2 rows, made before the runners are built:
    the Flax programs read the copies, passed in, and a changed kernel gets a new one); the
    float64 tests hold the loop's runner. The last request ends first, so the one before it
    finishes decoding alone, in one row."""
    t_model, f_model = pair("float32")
    rng = np.random.default_rng(5)
    reqs = [Request([int(x) for x in rng.integers(1, CONFIG.vocab_size, n)], max_new_tokens=new, do_sample=s,
                    top_k=9, seed=n) for n, s, new in ((3, False, 8), (12, True, 8), (7, True, 8), (16, False, 4))]
    taken, t_taken = spy_on_packs(monkeypatch, f_linear), spy_on_packs(monkeypatch, t_linear)
    streams = {}
    for twin, model, cls in (("torch", t_model, ts.Runner), ("flax", f_model, fs.Runner)):
        if switch == "scan_layers" and twin == "flax":
            model.model.scan_layers = True
        if switch == "packed":
            (t_linear if twin == "torch" else f_linear).prepack_linears(model, (1, 2))
        try:
            r = cls(model, 2, MAX_LEN, (16,), key_buckets=(MAX_LEN,), row_buckets=(1, 2))  # 4 programs
        finally:
            model.model.scan_layers = False
        events = list(r.run(reqs))
        if switch == "packed" and twin == "torch":
            assert any(t_taken)  # the eager runner's one- and two-row products
            t_linear.prepack_linears(model, ())  # the solo references below run on the plain weights
        streams[twin] = [(e.request_id, e.token) for e in events]
        bound = 2 * tolerance("float32", "logits") * 3.0  # final_logit_softcapping bounds |logits| by 3
        for e in events:
            assert np.log(e.top8.probs[0]) - np.log(e.top8.probs[1]) > bound
        for i, req in enumerate(reqs):
            out = torch_generate(t_model, torch.tensor([req.prompt]), max_new_tokens=req.max_new_tokens,
                                 do_sample=req.do_sample, top_k=req.top_k, seed=req.seed)
            assert r.result(i) == out[0, len(req.prompt):].tolist()
    assert streams["torch"] == streams["flax"]
    kernel = f_model.model.layers[1].self_attn.o_proj.kernel
    if switch == "scan_layers":
        # The stack follows the weights: the same stack while they stay, a new one once one changes.
        stack = r._layer_stack()
        assert r._layer_stack() is stack
        kernel.set_value(kernel.get_value() * 1)
        assert r._layer_stack() is not stack
        return
    # Every linear of the two decode programs took its copy when they were traced, and the LM head
    # of the two prefill programs (one row per prompt); the experts' kernels are stacked, never
    # called, and get no copy.
    layers = f_linear.linear_layers(f_model)
    called = [k for k in layers if "/experts/" not in k]
    assert taken.count(True) == 2 * len(called) + 2
    assert {k for k, layer in layers.items() if layer.packed} == set(called)
    f_linear.prepack_linears(f_model, ())
    key = "model/layers/1/self_attn/o_proj"
    copy = r._linear_packs()[key][1]
    assert r._linear_packs()[key][1] is copy
    kernel.set_value(kernel.get_value() * 2)
    assert np.array_equal(r._linear_packs()[key][1], np.asarray(kernel.get_value()).T)
    kernel.set_value(kernel.get_value() / 2)


def test_key_and_row_buckets():
    """Decode key lengths double from the smallest pad bucket and end at max_len; prefill row
    counts are powers of two and the slot count."""
    assert resolve_key_buckets((16, 32, 64), 192) == (16, 32, 64, 128, 192)
    assert resolve_key_buckets((8, 16), 26, (16,)) == (16, 26)
    assert resolve_row_buckets(8) == (1, 2, 4, 8) and resolve_row_buckets(3) == (1, 2, 3)
    assert resolve_row_buckets(1) == (1,) and resolve_row_buckets(8, (2,)) == (2, 8)
    with pytest.raises(ValueError, match="key_buckets"):
        resolve_key_buckets((8,), 26, (40,))
    with pytest.raises(ValueError, match="row_buckets"):
        resolve_row_buckets(3, (4,))


def test_runner_refuses_what_it_cannot_serve():
    r = ts.Runner(pair()[0], 1, MAX_LEN, BUCKETS)
    with pytest.raises(ValueError, match="max_len"):
        r.submit(Request([1] * 16, max_new_tokens=MAX_LEN))
    with pytest.raises(ValueError, match="pad bucket"):
        ts.Runner(pair()[0], 1, 40, BUCKETS).submit(Request([1] * 17, max_new_tokens=2))
    with pytest.raises(ValueError, match="filter_order"):
        r.submit(Request([1], max_new_tokens=2, filter_order="nucleus"))
    with pytest.raises(ValueError, match="allowed_tokens"):
        r.submit(Request([1], max_new_tokens=2, allowed_tokens=np.zeros(CONFIG.vocab_size, bool)))
    with pytest.raises(ValueError, match="tokenizer"):
        r.submit(Request("text without a tokenizer", max_new_tokens=2))
    with pytest.raises(ValueError, match="pad_buckets"):
        ts.Runner(pair()[0], 1, 12, BUCKETS)
    dynamic = CONFIG.replace(rope_scaling=RopeScaling("dynamic", factor=2.0), max_position_embeddings=16)
    with pytest.raises(ValueError, match="dynamic"):
        ts.Runner(twin_pair(dynamic)[0], 1, MAX_LEN, BUCKETS)
