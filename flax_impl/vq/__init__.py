"""Transformer-VQ, the Flax NNX twin (mirrors `torch_impl.vq` file for file)."""

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
