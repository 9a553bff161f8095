"""Transformer-VQ (Lingle, ICLR 2024), the PyTorch twin (mirrors `flax_impl.vq` file for file).

Ported from the reference implementation, transformer-vq/transformer_vq `main@21943e4`. What the
code relies on (the model, one sublayer, the caches, the dense formula the tests compare with,
training, the numerical notes) and its deliberate differences from the reference, identical in
both twins, are in `docs/transformer_vq.md`, with the axis letters.
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
