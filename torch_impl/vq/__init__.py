"""Transformer-VQ (Lingle, ICLR 2024), the PyTorch twin (mirrors `flax_impl.vq` file for file).

Ported from the reference implementation, transformer-vq/transformer_vq main@21943e4, per
`specs/transformer_vq.md`. Deliberate differences from the reference, identical in both twins:

* float64: the reference hard-codes float32 in the LayerNorm, the tied logits and the ScaledSin
  scale; here those are "at least float32" (max(float32, dtype)), so float64 runs stay float64
  (pitfall P10). In float32 / bfloat16 runs the arithmetic is the reference's.
* doc_ids are not carried: the reference stores them in the state but never reads them (its
  outputs do not change with them), so the state here is the rest of its cache table.
* dropout masks come from each framework's RNG (`rng`: a torch.Generator / a jax key) and the
  "timeless" masks (sinusoids, LayerDrop) are shared by the blocks of one call, not across the
  update chunks of a sequence; the twins agree only with every dropout rate at 0 (as in the spec).
* sampling uses the project's generation sampler (numpy noise from the seed, inverse CDF), not
  the reference's `prob.nucleus` with its 1e-4 slack; the main optimizer is Adam (the
  reference's adamw/lion/adafactor chains can replace it; the codebook group is SGD(lr=1) as there).
"""

from .attention import VQAttention, get_agg_biases, get_causal_mask, rel_shift
from .embeddings import Embeddings
from .layer import TransformerLayer
from .model import Transformer
from .norm import LayerNorm, layer_norm
from .position import ScaledSin, get_sinusoid_embs
from .quantizer import LearnableVQ, VQSpec, get_codewords, get_shortcodes

__all__ = ["VQAttention", "get_agg_biases", "get_causal_mask", "rel_shift", "Embeddings",
           "TransformerLayer", "Transformer", "LayerNorm", "layer_norm", "ScaledSin",
           "get_sinusoid_embs", "LearnableVQ", "VQSpec", "get_codewords", "get_shortcodes"]
