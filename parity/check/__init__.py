"""`twinlm check`: one model in both twins on the same inputs, every difference measured.

- `pair`: the whole-model check (`check_checkpoint` from a directory, `check_pair` on two loaded
  twins): hidden states, attention weights, head outputs and loss, gradients, KV-cache decoding;
- `generation`: the generation rows (greedy tokens of both twins' `generate()`).

The public names are re-exported here: `from parity.check import check_checkpoint`.
"""

from .pair import check_checkpoint, check_pair, flax_forward, to_jax, to_torch

__all__ = ["check_checkpoint", "check_pair", "flax_forward", "to_jax", "to_torch"]
