"""The third witness: both twins equal a plain-numpy forward pass written from the math
(tests/helpers/numpy_reference.py), so a mistake made identically in both twins cannot pass."""

import jax.numpy as jnp
import numpy as np
import torch
from hypothesis import given

from parity import strategies as tst
from parity.loading import copy_weights, twins_from_config
from tests.helpers import numpy_reference as ref
from tests.helpers.twins import assert_close, fcall, randomize
from torch_impl.checkpoint import state_to_numpy


@given(tst.configs(families=False), tst.data())
def test_both_twins_equal_the_numpy_witness(config, data):
    batch = data.draw(tst.batches(config))
    t_model, f_model = twins_from_config(config, "causal_lm", "float64", seed=2).pair
    randomize(t_model, seed=5)  # gains and biases away from their init, so every term counts
    copy_weights(t_model, f_model)
    weights = {k: v.astype(np.float64) for k, v in state_to_numpy(t_model).items()}
    pos = batch.position_ids
    expected = ref.causal_lm_logits(config, weights, batch.input_ids, batch.attention_mask, pos)
    with torch.no_grad():
        t_logits = t_model(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask),
                           None if pos is None else torch.from_numpy(pos)).logits
    f_logits = fcall(f_model, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                     None if pos is None else jnp.asarray(pos)).logits
    assert_close("torch vs numpy witness", expected, t_logits, "float64", "logits")
    assert_close("flax vs numpy witness", expected, f_logits, "float64", "logits")
    loss = ref.causal_lm_loss(expected, batch.labels)
    t_loss = t_model(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask),
                     None if pos is None else torch.from_numpy(pos), labels=torch.from_numpy(batch.labels)).loss
    assert_close("torch loss vs numpy witness", loss, t_loss, "float64", "loss")
