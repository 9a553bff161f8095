"""Tests of the twins: each layer, head and generate() in torch against Flax, against numpy and
transformers witnesses, and the mirror of their code."""
