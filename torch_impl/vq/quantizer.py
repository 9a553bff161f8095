"""Learnable VQ of the keys: shortcodes, codewords, exact straight-through, commitment loss and
the EMA k-means codebook trained through a surrogate loss (SGD at learning rate 1)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from weights.vq.config import TransformerVQConfig
from .common import sg, st, to_dtype

__all__ = ["VQSpec", "get_shortcodes", "get_codewords", "get_codebook", "get_codebook_ema_targets",
           "get_codebook_loss", "get_quantization_metrics", "LearnableVQ"]


class VQSpec(NamedTuple):
    """What the codebook surrogate needs beyond the keys.

    n_device: [1], data-parallel replicas whose gradients are averaged (the EMA is scaled by it).
    n_block_per_update: [1], blocks per optimizer update (gradients are averaged over them).
    loss_mask: [B, P] (or [B, L] for one block), 1 where a token counts.
    """

    n_device: torch.Tensor
    n_block_per_update: torch.Tensor
    loss_mask: torch.Tensor


def get_shortcodes(vecs: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vecs [B,H,L,d], codebook [H,C,d] -> (z [B,H,L] int32, errs2 [B,H,L]).

    Expanded |k|^2 - 2 k.c + |c|^2 (the reference's form: near-ties then break the same way); argmin takes the first index
    on ties; relu clips the cancellation negatives of the minimum."""
    diffs2 = (torch.sum(torch.square(vecs), dim=-1)[..., None]
              - 2.0 * torch.einsum("bhlk,hsk->bhls", vecs, codebook)
              + torch.sum(torch.square(codebook), dim=-1)[None, :, None, :])
    z = torch.argmin(diffs2, dim=-1)
    errs2 = torch.relu(torch.amin(diffs2, dim=-1))
    return z.to(torch.int32), errs2


def get_codewords(shortcodes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """z [B,H,L], codebook [H,C,d] -> codewords [B,H,L,d] (a gather along C)."""
    return torch.take_along_dim(codebook[None], shortcodes.long()[..., None], dim=2)


def get_codebook(c_sum: torch.Tensor, c_count: torch.Tensor) -> torch.Tensor:
    """c = c_sum / max(c_count, 0.01), stop-gradient'ed: attention never trains the codebook."""
    return sg(c_sum / torch.clamp(c_count[..., None], min=0.01))


def one_hot(z: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """JAX semantics: an out-of-range code (z == C, an empty cache slot) encodes to a zero row.
    torch's one_hot raises on it, so encode C + 1 classes and drop the last (never clamp: that would count a real code)."""
    return F.one_hot(z.long(), num_classes + 1)[..., :num_classes].to(dtype)


def get_codebook_ema_targets(vecs, shortcodes, c_sum, c_count, c_gamma: float, vq_spec: VQSpec):
    """EMA targets (1-g) d p sum_{b,t} r k + g c_sum and (1-g) d p sum r + g c_count,
    r = onehot(z) * mask; vecs [B,H,L,d], mask [B,L]."""
    g = c_gamma
    d, p = vq_spec.n_device, vq_spec.n_block_per_update
    r = one_hot(shortcodes, c_sum.shape[1], vecs.dtype)
    r = r * vq_spec.loss_mask[:, None, :, None].to(vecs.dtype)
    c_sum_hat = d * p * torch.einsum("bhts,bhtd->hsd", r, vecs)
    c_count_hat = d * p * torch.sum(r, dim=(0, 2))
    c_sum_tgt = (1 - g) * c_sum_hat + g * c_sum
    c_count_tgt = (1 - g) * c_count_hat + g * c_count
    return c_sum_tgt, c_count_tgt


def get_codebook_loss(vecs, shortcodes, c_sum, c_count, c_gamma: float, vq_spec: VQSpec) -> torch.Tensor:
    """Surrogate whose value is exactly 0 and whose gradient is c - target: one SGD(lr=1) step on
    it (gradients averaged over blocks and devices) is one EMA step of the codebook."""
    c_sum_tgt, c_count_tgt = get_codebook_ema_targets(vecs, shortcodes, c_sum, c_count, c_gamma, vq_spec)
    l_sum = torch.sum(sg(c_sum - c_sum_tgt) * st(c_sum))
    l_count = torch.sum(sg(c_count - c_count_tgt) * st(c_count))
    return l_count + l_sum


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.sum(torch.square(x), dim=-1))


def get_quantization_metrics(vecs, vecs_hat, errs2, c_sum, c_count, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference's 19 codebook / quantization metrics, each averaged to a scalar in dtype."""
    n_code = c_count.shape[1]
    eps, errmin, errmax, maskval = 1e-2, 0.0, 10.0, 1e30
    c_count = torch.clamp(c_count, min=eps)
    c = c_sum / c_count[..., None]
    c_norms = torch.clamp(_norm(c), min=eps)
    c_normed = c / c_norms[..., None]
    c_sims = torch.einsum("hsd,hzd->hsz", c_normed, c_normed)
    c_dists = _norm(c[:, :, None, :] - c[:, None, :, :])
    vec_norms = torch.clamp(_norm(vecs), min=eps)
    vec_hat_norms = torch.clamp(_norm(vecs_hat), min=eps)
    relative_errs = torch.clamp(torch.sqrt(errs2) / vec_norms, errmin, errmax)
    probs = c_count / torch.sum(c_count, dim=-1)[..., None]
    c_thresh_oob = torch.logical_or(c_count < 1.0, 1_000_000 < c_count).to(c_count.dtype)
    ones = torch.ones([1, n_code, n_code], dtype=c_sims.dtype)
    up, low = torch.triu(ones), torch.tril(ones, diagonal=-1)
    n_low = torch.sum(low, dim=(1, 2))
    metrics = dict(
        c_sim_min=torch.amin(low * c_sims + maskval * up, dim=(1, 2)),
        c_sim_mean=torch.sum(low * c_sims, dim=(1, 2)) / n_low,
        c_sim_max=torch.amax(low * c_sims - maskval * up, dim=(1, 2)),
        c_dist_min=torch.amin(low * c_dists + maskval * up, dim=(1, 2)),
        c_dist_mean=torch.sum(low * c_dists, dim=(1, 2)) / n_low,
        c_dist_max=torch.amax(low * c_dists - maskval * up, dim=(1, 2)),
        c_norm_min=torch.amin(c_norms, dim=1),
        c_norm_mean=torch.mean(c_norms, dim=1),
        c_norm_max=torch.amax(c_norms, dim=1),
        c_usage_min=torch.amin(c_count, dim=1),
        c_usage_mean=torch.mean(c_count, dim=1),
        c_usage_max=torch.amax(c_count, dim=1),
        c_thresh_oob=torch.sum(c_thresh_oob, dim=1),
        c_entropy=torch.sum(torch.special.entr(probs), dim=-1),
        vec_norm_mean=torch.mean(vec_norms, dim=2),
        vec_hat_norm_mean=torch.mean(vec_hat_norms, dim=2),
        relative_err_min=torch.amin(relative_errs, dim=2),
        relative_err_mean=torch.mean(relative_errs, dim=2),
        relative_err_max=torch.amax(relative_errs, dim=2),
    )
    return {k: torch.mean(sg(v)).to(dtype) for k, v in metrics.items()}


class LearnableVQ(nn.Module):
    """Per-head codebook `c_sum` [H,C,d_k] / `c_count` [H,C] (both parameters, trained only by
    the surrogate loss under SGD(lr=1))."""

    def __init__(self, config: TransformerVQConfig):
        super().__init__()
        self.config = config
        pdt = to_dtype(config.param_dtype)
        self.param_dtype, self.dtype = pdt, to_dtype(config.dtype)
        h, s = config.n_head, config.n_code
        # variance_scaling(1, fan_in) of a [H, C, d_k] array: fan_in = C * H.
        self.c_sum = nn.Parameter(torch.randn(h, s, config.d_k, dtype=pdt) / math.sqrt(h * s))
        self.c_count = nn.Parameter(torch.ones(h, s, dtype=pdt))

    def get_codebook(self) -> torch.Tensor:
        """The stop-gradient'ed codebook [H, C, d_k]."""
        return get_codebook(self.c_sum, self.c_count)

    def forward(self, vecs: torch.Tensor, vq_spec: VQSpec | None, is_train: bool) -> dict:
        """vecs [B,H,L,d_k] -> {quantized, shortcodes, l_commit, l_codebook, metrics, errs2}."""
        orig_dtype = vecs.dtype
        vecs_hp = vecs.to(self.param_dtype)
        c = self.get_codebook()
        z, errs2 = get_shortcodes(vecs_hp, c)
        errs2 = errs2.to(self.dtype)
        cz = get_codewords(z, c).to(orig_dtype)
        # sg(cz) + st(k): forward value bit-exactly cz, gradient exactly the identity (k - k is an exact zero).
        vecs_hat = sg(cz) + st(vecs)
        zero = torch.zeros((), dtype=self.dtype)
        l_commit, l_codebook, metrics = zero, zero, {}
        if is_train:
            mask = vq_spec.loss_mask.to(errs2.dtype)
            l_commit = torch.mean(torch.sum(mask[:, None, :] * errs2, dim=1))
            l_codebook = get_codebook_loss(vecs_hp, z, self.c_sum, self.c_count, self.config.c_gamma,
                                           vq_spec).to(self.dtype)
            metrics = get_quantization_metrics(sg(vecs), sg(vecs_hat), sg(errs2), sg(self.c_sum),
                                               sg(self.c_count), self.dtype)
        return dict(quantized=vecs_hat, shortcodes=z, l_commit=l_commit, l_codebook=l_codebook,
                    metrics=metrics, errs2=errs2)
