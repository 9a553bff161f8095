"""The small configs the tests share (each defined once)."""

from __future__ import annotations

from pathlib import Path

from parity.demo import tiny_config
from weights.config import ModelConfig

__all__ = ["REPO_ROOT", "TINY", "TINY_DEMO"]

REPO_ROOT = Path(__file__).resolve().parents[2]

# The smallest GQA LLaMA of the checkpoint-format tests: 2 layers, 4 query heads on 2 kv heads.
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)

# The demo's tiny causal LM (`parity.demo.tiny_config`), the model of the parity-check and CLI
# tests: `tests/parity/conftest.py` builds its checkpoint once per session.
TINY_DEMO = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3)
