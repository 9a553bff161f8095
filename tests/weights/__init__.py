"""Tests of `weights/`: safetensors IO, checkpoints, config, converter, load reports."""
