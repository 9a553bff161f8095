"""A third witness for `generate()`: Hugging Face transformers' own `generate`.

Twin parity proves the twins decode alike; the rules they share live once, in numpy
(`weights/shared/generation.py`: how many beam candidates survive a step, the pad token of
finished rows), where a mistake is made identically in both. Here the torch twin saves its
checkpoint, transformers loads it (float64, eager attention) and both run beam search with
2 beams and an eos token, under the three stopping rules, and greedy decoding with two eos
tokens: the sequences must be identical token for token. With 2 beams and one eos, HF keeps
4 candidates per step; the cases below are ones where keeping only 2 changes the result
(measured: 16 of 60 settings of this model differ when the candidates are cut to 2).

Finished rows are padded with `pad_token_id`, or without one with the first eos token (HF's
fallback), here both ways. transformers' beam search pads with eos instead when
`pad_token_id` is 0 (`pad_token_id or eos_token_id[0]` in its `_beam_search`), so the explicit
pad used here is not 0.
"""

from __future__ import annotations

import pytest
import torch

import torch_impl
from tests.helpers.transformers import require_transformers
from torch_impl.generation import generate
from weights.config import ModelConfig

CONFIG = ModelConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, initializer_range=0.3, pad_token_id=None)
PROMPTS = torch.tensor([[5, 6, 7, 8], [3, 4, 9, 1], [2, 2, 3, 10]])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    transformers = require_transformers()
    torch.manual_seed(0)
    twin = torch_impl.ForCausalLM(CONFIG, dtype=torch.float64).eval()
    path = tmp_path_factory.mktemp("generation-witness")
    twin.save_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                           attn_implementation="eager").eval()
    return twin, hf


@pytest.mark.parametrize("num_beams, eos, length_penalty, early_stopping, pad", [
    (2, 9, 1.0, False, None),  # pad falls back to the eos token
    (2, [3, 8], 2.0, "never", None),  # two eos tokens: the fallback is the first one given
    (2, 2, 2.0, "never", 4),
    (2, 1, 0.5, True, None),
    (1, [3, 8], 1.0, False, None),  # greedy: finished rows padded with the first eos token
])
def test_generate_equals_transformers(models, num_beams, eos, length_penalty, early_stopping, pad):
    twin, hf = models
    kw = dict(max_new_tokens=8, num_beams=num_beams, eos_token_id=eos, pad_token_id=pad,
              length_penalty=length_penalty, early_stopping=early_stopping)
    ours = generate(twin, PROMPTS, torch.ones_like(PROMPTS), **kw)
    with torch.no_grad():
        theirs = hf.generate(PROMPTS, attention_mask=torch.ones_like(PROMPTS), do_sample=False, **kw)
    assert ours.tolist() == theirs.tolist()
