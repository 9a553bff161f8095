"""The fused attention path ("fast": torch's scaled_dot_product_attention, jax.nn.dot_product_
attention) against the eager reference, in every dtype, within the tolerance table: a whole
GQA model's logits on a left-padded batch (padding queries see no key; the kernels take the
mask) and on an unpadded one (purely causal: the kernels take `is_causal` and no mask), and
greedy decoding through the KV cache. The eager path stays the default."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_impl.layers.attention as f_attention
import torch_impl.layers.attention as t_attention
from flax_impl.generation import generate as f_generate
from tests.helpers.configs import TINY
from tests.helpers.twins import assert_close, batch, fcall, randomized_pair, run_torch
from torch_impl.generation import generate as t_generate

# float64 and float16 included: there the switch must keep the eager path (jax's fused softmax is
# float32; its float16 dot does not compile on the CPU).
DTYPES = ("float64", "float32", "bfloat16", "float16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_attention_gives_the_eager_logits(dtype, monkeypatch):
    t_model, f_model = randomized_pair(TINY, dtype=dtype)
    fused = dtype in ("float32", "bfloat16")
    data = batch(TINY, b=2, t=9)
    ids, padding = data["input_ids"], data["attention_mask"]
    # case -> (padding mask of the eager reference, of the fast run). Padded: the kernels take the
    # mask. Unpadded (the fused dtypes; elsewhere both runs are eager): purely causal, the kernels
    # take their causal rule (`is_causal`) and no mask; the reference's all-ones padding mask gives
    # the same keep-mask as none, and reuses the padded case's compiled Flax call.
    cases = {"padded": (padding, padding), **({"causal": (np.ones_like(padding), None)} if fused else {})}
    # Which branches the fused calls took (`is_causal`, their last argument), per case.
    branches = {case: {"torch": set(), "Flax": set()} for case in cases}
    case = None
    for twin, module in (("torch", t_attention), ("Flax", f_attention)):
        def spied(*args, _real=module.attention_fast, _twin=twin):
            branches[case][_twin].add(args[-1])
            return _real(*args)
        monkeypatch.setattr(module, "attention_fast", spied)
    for case, (reference_mask, mask) in cases.items():
        t_attention.set_attn_implementation(t_model, "eager")
        f_attention.set_attn_implementation(f_model, "eager")
        eager = (run_torch(t_model, {"input_ids": ids, "attention_mask": reference_mask}).logits,
                 fcall(f_model, jnp.asarray(ids), jnp.asarray(reference_mask)).logits)
        t_attention.set_attn_implementation(t_model, "fast")
        f_attention.set_attn_implementation(f_model, "fast")
        inputs = {"input_ids": ids, **({} if mask is None else {"attention_mask": mask})}
        # A jitted function of its own, traced here (`fcall`'s may hold a trace from another test).
        f_mask = None if mask is None else jnp.asarray(mask)
        fast = (run_torch(t_model, inputs).logits, nnx.jit(lambda m, *a: m(*a))(f_model, jnp.asarray(ids), f_mask).logits)
        assert branches[case] == {twin: {case == "causal"} if fused else set() for twin in ("torch", "Flax")}, case
        for twin, reference, got in zip(("torch", "Flax"), eager, fast):
            reference = reference.detach().double().numpy() if twin == "torch" else np.asarray(reference, np.float64)
            got = got.detach().double().numpy() if twin == "torch" else np.asarray(got, np.float64)
            assert_close(f"{twin} fast logits ({case})", reference, got, dtype, "logits")


def test_fast_attention_decodes_the_eager_tokens_and_is_not_the_default():
    t_model, f_model = randomized_pair(TINY, dtype="float32")
    assert {m.attn_implementation for m in t_model.modules() if isinstance(m, t_attention.Attention)} == {"eager"}
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 5))
    eager = t_generate(t_model, torch.from_numpy(ids), max_new_tokens=6).numpy()
    t_attention.set_attn_implementation(t_model, "fast")
    f_attention.set_attn_implementation(f_model, "fast")
    np.testing.assert_array_equal(t_generate(t_model, torch.from_numpy(ids), max_new_tokens=6).numpy(), eager)
    np.testing.assert_array_equal(np.asarray(f_generate(f_model, ids, max_new_tokens=6)), eager)
    with pytest.raises(ValueError, match="'eager' or 'fast'"):
        t_attention.set_attn_implementation(t_model, "sdpa")
