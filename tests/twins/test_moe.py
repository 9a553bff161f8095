"""Mixture of experts, soft-capping and sandwich norms (Mixtral, Gemma 2, Grok-1 switches), in both twins.

The MoE block, its router gradients and the load-balancing loss agree between the twins on
hypothesis-drawn expert counts, top-k and shapes (float64 per the table), and with a plain numpy
version written from HF Mixtral's formulas. Ties between equal router probabilities go to the
lower expert index in both twins (a stable descending sort). Cached decoding equals the full
pass with experts, capped scores and alternating windows together (Grok-1's switches on a
LLaMA layout); the Mixtral- and Gemma 2-layout checkpoints are in test_families.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import flax_impl
import flax_impl.layers.moe as fmoe
import torch_impl.layers.moe as tmoe
from parity import strategies as tst
from parity.compare import to_numpy
from parity.loading import copy_weights
from tests.helpers.numpy_reference import act, softmax
from tests.helpers.twins import assert_close, batch, decode_matches_full_pass, randomized_pair, run_flax, run_torch
from weights.config import ModelConfig
from weights.shared.generation import position_ids_from_mask


def moe_config(experts: int, top_k: int, hidden: int = 8, inter: int = 6, norm_topk_prob: bool = True,
               act: str = "silu") -> ModelConfig:
    return ModelConfig.for_family("mixtral", vocab_size=16, hidden_size=hidden, intermediate_size=inter,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                  num_local_experts=experts, num_experts_per_tok=top_k,
                                  norm_topk_prob=norm_topk_prob, hidden_act=act)


def block_pair(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    t_block = tmoe.SparseMoeBlock(config, dtype=torch.float64)
    with torch.no_grad():
        for p in t_block.parameters():
            p.normal_(0.0, 0.5)
    # Shapes only (no eager random init to compile), then the torch weights.
    f_block = nnx.eval_shape(lambda: fmoe.SparseMoeBlock(config, dtype=jnp.float64, rngs=nnx.Rngs(seed)))
    copy_weights(t_block, f_block)
    return t_block, f_block


def moe_numpy(block: torch.nn.Module, x: np.ndarray, top_k: int, norm_topk_prob: bool, act_name: str) -> np.ndarray:
    """HF Mixtral's block token by token: softmax over all experts, the k most probable (lower
    index first among equals), renormalised or not, each expert `w2(act(w1 x) * w3 x)`."""
    w = {n: p.detach().numpy() for n, p in block.named_parameters()}
    out = np.zeros_like(x)
    for n, token in enumerate(x):
        p = softmax(w["gate.weight"] @ token)
        chosen = sorted(range(len(p)), key=lambda j: (-p[j], j))[:top_k]
        weights = p[chosen] / (p[chosen].sum() if norm_topk_prob else 1.0)
        for wj, j in zip(weights, chosen):
            h = act(act_name, w[f"experts.{j}.w1.weight"] @ token) * (w[f"experts.{j}.w3.weight"] @ token)
            out[n] += wj * (w[f"experts.{j}.w2.weight"] @ h)
    return out


def aux_loss_numpy(layers: list[np.ndarray], experts: int, top_k: int, mask: np.ndarray | None) -> float:
    """HF `load_balancing_loss_func` written out: over the real tokens of every layer, the
    fraction of top-k slots each expert takes, times its mean router probability, summed, * X."""
    keep = np.ones(layers[0].shape[0]) if mask is None else mask.reshape(-1).astype(float)
    frac, prob, count = np.zeros((top_k, experts)), np.zeros(experts), 0.0
    for logits in layers:
        for row, m in zip(logits, keep):
            if not m:
                continue
            p = softmax(row)
            chosen = sorted(range(experts), key=lambda j: (-p[j], j))[:top_k]
            for slot, j in enumerate(chosen):
                frac[slot, j] += 1
            prob += p
            count += 1
    return float((frac / count * (prob / count)[None]).sum() * experts)


# Shapes come from small sets: every new shape costs the eager Flax twin its compilations.
@settings(max_examples=min(10, settings.default.max_examples), deadline=None)  # the CI profile bounds it too
@given(experts=st.integers(1, 4), data=st.data(), norm_topk_prob=st.booleans(),
       tokens=st.sampled_from([(2, 3), (1, 6)]), act_name=st.sampled_from(["silu", "gelu_pytorch_tanh"]))
def test_moe_block_forward_and_gradients(experts, data, norm_topk_prob, tokens, act_name):
    top_k = data.draw(st.integers(1, experts), label="top_k")
    config = moe_config(experts, top_k, norm_topk_prob=norm_topk_prob, act=act_name)
    t_block, f_block = block_pair(config, data.draw(st.integers(0, 99), label="seed"))
    rng = np.random.default_rng(experts)
    x = rng.standard_normal(tokens + (config.hidden_size,))
    r = rng.standard_normal(x.shape)

    xt = torch.tensor(x, requires_grad=True)
    t_out, t_logits = t_block(xt)
    t_loss = (t_out * torch.from_numpy(r)).sum() + 0.3 * tmoe.load_balancing_loss((t_logits,), experts, top_k)
    t_loss.backward()

    def f_loss(block, xj):
        out, logits = block(xj)
        return (out * r).sum() + 0.3 * fmoe.load_balancing_loss((logits,), experts, top_k), (out, logits)

    (f_val, (f_out, f_logits)), (g_block, g_x) = nnx.value_and_grad(f_loss, argnums=(0, 1), has_aux=True)(
        f_block, jnp.asarray(x))
    assert_close("moe output", t_out, f_out, "float64")
    assert_close("router logits", t_logits, f_logits, "float64")
    assert_close("moe loss", t_loss, f_val, "float64", "loss")
    assert_close("grad input", xt.grad, g_x, "float64", "gradients")
    f_grads = {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(g_block)}
    for name, p in t_block.named_parameters():
        path = name.rsplit(".", 1)[0] + ".kernel"
        assert_close(f"grad {name}", p.grad.T, f_grads[path], "float64", "gradients")  # the router's `gate` included
    witness = moe_numpy(t_block, x.reshape(-1, config.hidden_size), top_k, norm_topk_prob, act_name)
    assert_close("numpy witness", witness, t_out.detach().reshape(-1, config.hidden_size), "float64")


def _block_outputs(block, x: np.ndarray, r: np.ndarray, framework: str) -> dict[str, np.ndarray]:
    """Output, input gradient and parameter gradients (HF names, [out, in]) of `sum(out * r)`."""
    if framework == "torch":
        block.zero_grad(set_to_none=True)
        xt = torch.tensor(x, requires_grad=True)
        out, _ = block(xt)
        (out * torch.from_numpy(r)).sum().backward()
        return {"out": to_numpy(out), "x": to_numpy(xt.grad),
                **{n: to_numpy(p.grad) for n, p in block.named_parameters()}}
    (_, out), (g_block, g_x) = _flax_block_grads(block, jnp.asarray(x), jnp.asarray(r))
    grads = {".".join(map(str, path[:-1])) + ".weight": np.asarray(v[...]).T for path, v in nnx.to_flat_state(g_block)}
    return {"out": np.asarray(out), "x": np.asarray(g_x), **grads}


@nnx.jit
def _flax_block_grads(block, x, r):
    def loss(b, xj):
        out, _ = b(xj)
        return (out * r).sum(), out

    return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(block, x)


def test_sparse_dispatch_equals_the_dense_reference():
    """The fast path (torch: HF's per-expert loop; Flax: tokens sorted by expert, `ragged_dot`)
    against the reference formula in each twin: same output and gradients, an expert that gets
    no token included (three tokens, top-2 of five: its gradient is zero either way)."""
    experts, top_k, tokens = 5, 2, 3
    config = moe_config(experts, top_k)
    t_block, f_block = block_pair(config, seed=experts + top_k)
    rng = np.random.default_rng(tokens)
    x, r = rng.standard_normal((1, tokens, config.hidden_size)), rng.standard_normal((1, tokens, config.hidden_size))
    for framework, block, switch in (("torch", t_block, tmoe.set_moe_dispatch), ("flax", f_block, fmoe.set_moe_dispatch)):
        dense = _block_outputs(switch(block, "dense"), x, r, framework)
        sparse = _block_outputs(switch(block, "sparse"), x, r, framework)
        assert dense.keys() == sparse.keys()
        for name in dense:
            assert_close(f"{framework} sparse vs dense: {name}", dense[name], sparse[name], "float64",
                         "activations" if name == "out" else "gradients")
        idle = [j for j in range(experts) if not np.any(dense[f"experts.{j}.w1.weight"])]
        assert idle, "the example should leave an expert without tokens"


def test_dispatch_is_checked():
    config = moe_config(2, 1)
    with pytest.raises(ValueError, match="dispatch must be one of"):
        tmoe.SparseMoeBlock(config, dispatch="fast")
    with pytest.raises(ValueError, match="dispatch must be one of"):
        fmoe.set_moe_dispatch(nnx.eval_shape(lambda: fmoe.SparseMoeBlock(config, rngs=nnx.Rngs(0))), "fast")


@settings(max_examples=min(10, settings.default.max_examples), deadline=None)  # the CI profile bounds it too
@given(layers=st.integers(1, 2), bt=st.sampled_from([(2, 3), (1, 6)]), experts=st.integers(1, 4),
       data=st.data(), masked=st.booleans())
def test_load_balancing_loss(layers, bt, experts, data, masked):
    b, t = bt
    top_k = data.draw(st.integers(1, experts), label="top_k")
    rng = np.random.default_rng(layers * 100 + experts)
    logits = [rng.standard_normal((b * t, experts)) * 2 for _ in range(layers)]
    if data.draw(st.booleans(), label="ties"):
        logits[0][0] = 0.0  # one token whose router sees all experts as equal
    mask = None
    if masked:
        mask = (rng.random((b, t)) > 0.3).astype(np.int64)
        mask[0, -1] = 1  # at least one real token
    t_logits = tuple(torch.tensor(z, requires_grad=True) for z in logits)
    t_aux = tmoe.load_balancing_loss(t_logits, experts, top_k, None if mask is None else torch.from_numpy(mask))
    t_aux.backward()
    f_mask = None if mask is None else jnp.asarray(mask)
    f_aux, f_grads = jax.value_and_grad(lambda zs: fmoe.load_balancing_loss(zs, experts, top_k, f_mask))(
        tuple(jnp.asarray(z) for z in logits))
    assert_close("aux loss", t_aux, f_aux, "float64", "loss")
    assert_close("aux loss vs numpy", aux_loss_numpy(logits, experts, top_k, mask), t_aux, "float64", "loss")
    for i, (a, g) in enumerate(zip(t_logits, f_grads)):
        assert_close(f"grad logits[{i}]", a.grad, g, "float64", "gradients")


def test_ties_go_to_the_lower_expert_index():
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1], [0.3, 0.1, 0.3, 0.3]])
    expected = np.array([[0, 1], [1, 2], [0, 2]])
    t_w, t_idx = tmoe.top_k_lowest_index(torch.from_numpy(probs), 2)
    f_w, f_idx = fmoe.top_k_lowest_index(jnp.asarray(probs), 2)
    np.testing.assert_array_equal(t_idx.numpy(), expected)
    np.testing.assert_array_equal(np.asarray(f_idx), expected)
    np.testing.assert_array_equal(t_w.numpy(), np.take_along_axis(probs, expected, -1))
    np.testing.assert_array_equal(np.asarray(f_w), np.take_along_axis(probs, expected, -1))


def test_zero_router_picks_the_first_experts():
    """A zero router gives every expert the same logit: both twins pick experts 0..k-1, with
    weights 1/k (Mixtral) or the raw probabilities 1/X (Grok-1's `norm_topk_prob=False`)."""
    x = np.random.default_rng(0).standard_normal((1, 3, 8))
    for norm in (True, False):
        config = moe_config(4, 2, norm_topk_prob=norm)
        t_block, f_block = block_pair(config)
        with torch.no_grad():
            t_block.gate.weight.zero_()
        copy_weights(t_block, f_block)
        experts = [t_block.experts[j](torch.from_numpy(x[0])).detach().numpy() for j in (0, 1)]
        expected = (experts[0] + experts[1]) * (0.5 if norm else 0.25)
        t_out, _ = t_block(torch.from_numpy(x))
        f_out, _ = f_block(jnp.asarray(x))
        assert_close(f"torch (norm={norm})", expected, t_out[0], "float64")
        assert_close(f"flax (norm={norm})", expected, f_out[0], "float64")


def test_causal_lm_loss_adds_the_router_aux_loss():
    config = tst.family_examples()["mixtral"]
    x = batch(config)
    inputs = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "labels": x["labels"]}
    t_model, f_model = randomized_pair(config)
    t_out, f_out = run_torch(t_model, inputs), run_flax(f_model, inputs)
    logits_only = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    for label, out, run, model in (("torch", t_out, run_torch, t_model), ("flax", f_out, run_flax, f_model)):
        assert len(out.router_logits) == config.num_hidden_layers
        ce = float(to_numpy(out.loss)) - config.router_aux_loss_coef * float(to_numpy(out.aux_loss))
        logits = to_numpy(run(model, logits_only).logits)
        # Cross-entropy of the next token over the real labels, from the logits (numpy).
        z = logits[:, :-1][x["labels"][:, 1:] != -100]
        y = x["labels"][:, 1:][x["labels"][:, 1:] != -100]
        nll = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1) - z[np.arange(len(y)), y]
        assert_close(f"{label} loss - coef * aux", nll.mean(), ce, "float64", "loss")
        real = x["attention_mask"]
        assert_close(f"{label} aux", aux_loss_numpy([to_numpy(r) for r in out.router_logits], config.num_local_experts,
                                             config.num_experts_per_tok, real), out.aux_loss, "float64", "loss")
    quiet, _ = randomized_pair(config.replace(output_router_logits=False))
    out = run_torch(quiet, inputs)
    assert out.aux_loss is None and out.router_logits is None


GROK_LIKE = ModelConfig.for_family(
    "llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, pad_token_id=0,
    num_local_experts=4, num_experts_per_tok=2, norm_topk_prob=False,  # Grok-1 routing
    sandwich_norm=True, attn_logit_softcapping=1.0, scale_embeddings=True, final_logit_softcapping=3.0,
    use_sliding_window=True, sliding_window=3, sliding_window_pattern=2)  # layer 0 slides, layer 1 global


def test_cached_decoding_with_experts_softcaps_and_alternating_windows():
    assert GROK_LIKE.layer_windows == (3, None)
    decode_matches_full_pass(GROK_LIKE)


def test_jitted_decode_step_matches_eager():
    """The compiled path: one Flax decode step under `nnx.jit` (traced cache length, so the
    window mask and the aux-loss mask slice are traced too) equals the eager step."""
    config = GROK_LIKE.replace(output_router_logits=True, num_hidden_layers=1)  # one layer: a quicker compile
    _, model = randomized_pair(config)
    x = batch(config)
    ids, mask = jnp.asarray(x["input_ids"]), jnp.asarray(x["attention_mask"])
    cache = flax_impl.KVCache.init(config, ids.shape[0], ids.shape[1], dtype=jnp.float64)
    for i in range(4):  # eager prefill, token by token (the shapes test_cached_decoding already compiled)
        cache = model(ids[:, i:i + 1], attention_mask=mask, past_key_values=cache, use_cache=True).past_key_values

    @nnx.jit
    def step(m, token, cache, labels):
        out = m(token, attention_mask=mask, past_key_values=cache, use_cache=True, labels=labels)
        return out.logits, out.loss, out.aux_loss

    # One-token step: the next-token loss has no target left (0), the loss is coef * aux.
    token = ids[:, 4:5]
    eager = model(token, attention_mask=mask, past_key_values=cache, use_cache=True, labels=token)
    jitted = step(model, token, cache, token)
    assert_close("jitted logits", eager.logits, jitted[0], "float64", "logits")
    assert_close("jitted loss", eager.loss, jitted[1], "float64", "loss")
    assert_close("jitted aux loss", eager.aux_loss, jitted[2], "float64", "loss")


EVERY_SWITCH = GROK_LIKE.replace(qkv_bias=True, norm_unit_offset=True, query_pre_attn_scalar=6.0,
                                 hidden_activation="gelu_pytorch_tanh", output_router_logits=True)


def test_greedy_generation_with_every_switch():
    """`generate` (the Flax twin's is one jitted while-loop) gives the same tokens in both twins
    with all switches on at once, and each token is the argmax of a plain full forward pass."""
    t_model, f_model = randomized_pair(EVERY_SWITCH)
    x = batch(EVERY_SWITCH, t=4)
    ids, mask = x["input_ids"], x["attention_mask"]
    new = 6
    t_seq = to_numpy(t_model.generate(torch.from_numpy(ids), torch.from_numpy(mask), max_new_tokens=new))
    f_seq = to_numpy(f_model.generate(jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=new))
    np.testing.assert_array_equal(t_seq, f_seq)
    full_mask = np.concatenate([mask, np.ones((mask.shape[0], new), np.int64)], axis=1)
    positions = position_ids_from_mask(full_mask)  # generation's left-padding positions
    logits = to_numpy(t_model(torch.from_numpy(t_seq), attention_mask=torch.from_numpy(full_mask),
                              position_ids=torch.from_numpy(positions)).logits)
    np.testing.assert_array_equal(logits[:, ids.shape[1] - 1:-1].argmax(-1), t_seq[:, ids.shape[1]:])
