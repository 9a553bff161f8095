"""The PyTorch twin of the LLaMA-family decoder (mirrors `flax_impl` file for file)."""

from .heads import ForCausalLM, ForQuestionAnswering, ForSequenceClassification
from .layers.attention import Attention, KVCache
from .layers.mlp import MLP
from .layers.moe import ExpertMLP, SparseMoeBlock
from .layers.norm import RMSNorm
from .layers.rope import RotaryEmbedding
from .model import DecoderLayer, DecoderModel

__all__ = ["Attention", "DecoderLayer", "DecoderModel", "ExpertMLP", "ForCausalLM", "ForQuestionAnswering",
           "ForSequenceClassification", "KVCache", "MLP", "RMSNorm", "RotaryEmbedding", "SparseMoeBlock"]
