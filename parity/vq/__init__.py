"""Parity of the Transformer-VQ twins (`torch_impl.vq`, `flax_impl.vq`).

- `pairs`: both twins built with the same weights, and helpers to compare outputs and states;
- `reference`: the dense formula in plain numpy, the third witness;
- `strategies`: hypothesis strategies for configs and inputs (public, for users' own CI).
"""
