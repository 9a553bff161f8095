"""A third witness for the family switches: Hugging Face `transformers` itself.

Twin parity proves the twins agree; this proves they compute what HF's modeling files compute
for each family — Gemma's `1 + w` norms, sqrt(E) embeddings and tanh-GELU fallback, Qwen2's
q/k/v biases and `max_window_layers`, Mistral's window, Gemma 2's caps, query scalar, sandwich
norms and alternating windows, Mixtral's routing and load-balancing loss. The torch twin saves
its checkpoint with `save_pretrained`; transformers loads it (eager attention, eager experts)
and runs the same batch.

The bound is 2e-6, not float64's: transformers computes RMSNorm statistics and rotary
frequencies in float32 even in a float64 model, where twinlm keeps float64. Measured on these
examples (transformers 5.24): logits 1.3e-7 (llama3) to 7.5e-7 (gemma2), losses 3.8e-8 to
3.2e-7, Mixtral's aux loss 4.8e-8 and router logits 3.5e-7; 2e-6 keeps 2.7x above the worst.
At this bound the RMSNorm with its epsilon outside the square root, x / (sqrt(var) + eps),
fails for six of the seven families (8.5e-6 to 1.4e-4; Gemma, whose sqrt(E)-scaled residual
dwarfs eps, moves by 8.0e-7 only: the float64 numpy witness catches it there). Every switch
matters far above it: measured against the same
transformers runs, dropping Gemma 2's attention cap moves the logits by 3.9e-1, its final cap
5.9e-1, its window 1.2, its query scalar 8.1e-2; Mixtral with Grok-1 routing 1.8e-1; Gemma
without its norm offset / embedding scale 7.7e-1, with the exact instead of the tanh GELU
1.2e-4; Qwen2 without its window 2.1e-1.
The batch is right-padded: with left padding, transformers' eager path turns a fully masked
query row into NaN, which then reaches that row's later positions through zero-weighted values.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import torch_impl
from parity import strategies as tst
from tests.helpers.transformers import require_transformers
from tests.helpers.twins import batch

EXAMPLES = tst.family_examples()
# Measured worst 7.5e-7 (gemma2 logits): transformers' float32 norm statistics and rotary angles
# (module docstring); 2.7x headroom.
BOUND = 2e-6


def torch_twin(config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch_impl.ForCausalLM(config, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("norm.weight") and not config.norm_unit_offset else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model.eval()


@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_torch_twin_matches_transformers(family, tmp_path):
    transformers = require_transformers()
    config = EXAMPLES[family]
    twin = torch_twin(config)
    twin.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager").eval()
    assert type(hf).__name__ == config.hf_class_prefix + "ForCausalLM"
    x = batch(config)
    mask = np.ascontiguousarray(x["attention_mask"][:, ::-1])  # right padding (see the docstring)
    ids = torch.from_numpy(np.where(mask == 1, x["input_ids"][:, ::-1], 0).copy())
    labels = torch.where(torch.from_numpy(mask) == 1, ids, -100)
    mask = torch.from_numpy(mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        got = twin(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    err = (ref.logits[real] - got.logits[real]).abs().max().item() / max(1.0, ref.logits[real].abs().max().item())
    assert err <= BOUND, f"{family}: logits differ from transformers by {err:.2e}"
    loss_err = abs(ref.loss.item() - got.loss.item())
    assert loss_err <= BOUND, f"{family}: loss differs from transformers by {loss_err:.2e}"
    if config.is_moe and config.output_router_logits:
        aux_err = abs(ref.aux_loss.item() - got.aux_loss.item())
        assert aux_err <= BOUND, f"{family}: aux loss differs from transformers by {aux_err:.2e}"
        for i, (a, b) in enumerate(zip(ref.router_logits, got.router_logits, strict=True)):
            router_err = (a - b).abs().max().item()
            assert router_err <= BOUND, f"{family}: router logits [{i}] differ from transformers by {router_err:.2e}"


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_transformers_fails_under_ci(monkeypatch, ci, outcome):
    """Without transformers the witnesses skip on a developer's machine and fail in CI."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="transformers is not installed"):
        require_transformers()
