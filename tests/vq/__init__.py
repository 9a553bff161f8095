"""Tests of Transformer-VQ: units, model, twin parity, checkpoints, dropout."""
