"""TransformerLayer: two VQ-attention (GAU) sublayers, each run over all blocks of the call with
its own carried state, each followed by a LayerDrop'ed residual add. There is no MLP: a GAU
plays both roles, so two GAUs mirror the Attn + MLP pair of a standard layer."""

from __future__ import annotations

import torch
from torch import nn

from weights.vq.config import TransformerVQConfig
from .attention import VQAttention
from .common import at_least_float32, dropout_mask, to_dtype
from .quantizer import VQSpec

__all__ = ["TransformerLayer", "mean_over_blocks"]


def mean_over_blocks(outs: list[dict]) -> dict:
    """Average per-block losses and metrics over the blocks (the reference's tree-mapped mean)."""
    l_commit = torch.mean(torch.stack([o["l_commit"] for o in outs]))
    l_codebook = torch.mean(torch.stack([o["l_codebook"] for o in outs]))
    metrics = {k: torch.mean(torch.stack([o["metrics"][k] for o in outs])) for k in outs[0]["metrics"]}
    return dict(l_commit=l_commit, l_codebook=l_codebook, metrics=metrics)


class TransformerLayer(nn.Module):
    """`scanned_attn1` then `scanned_attn2`, pre-norm (the norm is inside each sublayer)."""

    def __init__(self, config: TransformerVQConfig):
        super().__init__()
        self.config = config
        self.dtype = to_dtype(config.dtype)
        self.scanned_attn1 = VQAttention(config)
        self.scanned_attn2 = VQAttention(config)

    @staticmethod
    def initial_state(config: TransformerVQConfig, batch_size: int) -> list[dict]:
        """[state of sublayer 1, state of sublayer 2]."""
        return [VQAttention.initial_state(config, batch_size), VQAttention.initial_state(config, batch_size)]

    def _sublayer(self, attn: VQAttention, x: torch.Tensor, state: dict, vq_specs: VQSpec | None,
                  is_train: bool, rng: torch.Generator | None):
        """Scan one sublayer over the N blocks of x [N,B,L,E]; returns ([N,B,L,E], state, aux).
        `vq_specs` holds a [N,B,L] loss mask (blocks first)."""
        c = self.config
        n_block, bsz, block_len, _ = x.shape
        # "timeless" masks: drawn once per call, shared by every block.
        dropsin = dropout_mask((c.mem_len + block_len, c.d_model), c.p_dropsin,
                               at_least_float32(self.dtype), rng) if is_train else None
        droplyr = dropout_mask((1, bsz, 1, 1), c.p_droplyr, self.dtype, rng) if is_train else None
        masks = None if vq_specs is None else vq_specs.loss_mask
        res, outs = [], []
        for k in range(n_block):
            spec = None if vq_specs is None else VQSpec(vq_specs.n_device, vq_specs.n_block_per_update, masks[k])
            state, out = attn(state, x[k], spec, is_train=is_train, dropsin=dropsin, rng=rng)
            res.append(out.pop("res"))
            outs.append(out)
        r = torch.stack(res)
        if droplyr is not None:
            r = r * droplyr
        return x + r, state, mean_over_blocks(outs)

    def forward(self, x: torch.Tensor, state: list[dict], vq_specs: VQSpec | None = None, *,
                is_train: bool = False, rng: torch.Generator | None = None) -> dict:
        """x [N,B,L,E] -> {output_features, attn_state, l_commit, l_codebook, metrics}."""
        state1, state2 = state
        x, state1, aux1 = self._sublayer(self.scanned_attn1, x, state1, vq_specs, is_train, rng)
        x, state2, aux2 = self._sublayer(self.scanned_attn2, x, state2, vq_specs, is_train, rng)
        metrics = {k: (aux1["metrics"][k] + aux2["metrics"][k]) / 2 for k in aux1["metrics"]}
        return dict(output_features=x, attn_state=[state1, state2],
                    l_commit=aux1["l_commit"] + aux2["l_commit"],
                    l_codebook=aux1["l_codebook"] + aux2["l_codebook"], metrics=metrics)
