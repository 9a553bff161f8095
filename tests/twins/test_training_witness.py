"""A third witness for training: Hugging Face `transformers`' `LlamaForCausalLM`, trained with
`torch.optim.AdamW` (the same two weight-decay groups), `get_cosine_schedule_with_warmup` and
`clip_grad_norm_`, takes the same K steps as the torch twin's `train_step` (float32, 1e-5;
measured: identical to the last bit, the two run the same torch kernels in the same order).
The batch is right-padded: transformers' eager attention turns a fully masked (left-padding)
query row into NaN (see test_families_witness)."""

from __future__ import annotations

import pytest
import torch

import torch_impl
from parity.check.training import training_batch
from parity.inputs import seeded_batch
from tests.helpers.configs import TINY_DEMO
from torch_impl import training
from weights.shared.training import TrainingHParams, decays

transformers = pytest.importorskip("transformers")

BOUND = 1e-5
HPARAMS = TrainingHParams(learning_rate=1e-2, weight_decay=0.1, warmup_steps=1, max_steps=3, max_grad_norm=0.5)


def test_torch_twin_trains_like_transformers(tmp_path):
    torch.manual_seed(0)
    twin = torch_impl.ForCausalLM(TINY_DEMO, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in twin.parameters():
            if p.dim() == 1:  # norm gains off 1, so a twin ignoring them would show
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    twin.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == "LlamaForCausalLM"
    twin.train()
    hf.train()
    optimizer = training.make_optimizer(twin, HPARAMS)
    named = list(hf.named_parameters())
    hf_opt = torch.optim.AdamW([{"params": [p for n, p in named if decays(n)], "weight_decay": HPARAMS.weight_decay},
                                {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}],
                               lr=HPARAMS.learning_rate, betas=(HPARAMS.adam_beta1, HPARAMS.adam_beta2),
                               eps=HPARAMS.adam_epsilon)
    hf_sched = transformers.get_cosine_schedule_with_warmup(hf_opt, HPARAMS.warmup_steps, HPARAMS.max_steps)
    for step in range(HPARAMS.max_steps):
        batch = training_batch(seeded_batch(TINY_DEMO, 4, 12, step, paddings=("right", "none") * 2), "causal_lm", "torch")
        batch.pop("position_ids")  # HF derives the same 0, 1, 2, ... for right padding
        metrics = training.train_step(twin, optimizer, batch)
        hf_opt.zero_grad()
        out = hf(**batch)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), HPARAMS.max_grad_norm)
        hf_opt.step()
        hf_sched.step()
        assert abs(metrics["loss"].item() - out.loss.item()) <= BOUND
        assert abs(metrics["grad_norm"].item() - norm.item()) <= BOUND * max(1, norm.item())
        ours = dict(twin.named_parameters())
        for name, p in hf.named_parameters():
            err = (ours[name] - p).abs().max().item() / max(1.0, p.abs().max().item())
            assert err <= BOUND, f"step {step + 1}: {name} differs from transformers by {err:.2e}"
