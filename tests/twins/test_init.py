"""Parameter init as HF does it, in both twins: normal(0, initializer_range) for linear and
embedding weights, zero biases, ones for norms, a zero embedding row at `pad_token_id`."""

import numpy as np
import pytest
import torch
from flax import nnx

import flax_impl
import torch_impl
from flax_impl.checkpoint import state_to_numpy as flax_state
from torch_impl.checkpoint import state_to_numpy as torch_state
from weights.config import ModelConfig

CONFIG = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                     pad_token_id=3, initializer_range=0.05)


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_init_follows_hf(twin):
    if twin == "torch":
        torch.manual_seed(0)
        state = torch_state(torch_impl.ForCausalLM(CONFIG))
    else:
        state = flax_state(flax_impl.ForCausalLM(CONFIG, rngs=nnx.Rngs(0)))
    for name, w in state.items():
        w = np.asarray(w, np.float64)
        if name.endswith("norm.weight"):
            assert np.all(w == 1.0), name
        elif name.endswith(".bias"):
            assert np.all(w == 0.0), name
        else:
            if name == "model.embed_tokens.weight":
                assert np.all(w[CONFIG.pad_token_id] == 0.0)
                w = np.delete(w, CONFIG.pad_token_id, axis=0)
            # Thousands of draws: mean within 5 standard errors of 0, std within 5%.
            assert abs(w.mean()) < 5 * 0.05 / np.sqrt(w.size), name
            assert abs(w.std() / 0.05 - 1) < 0.05, name
