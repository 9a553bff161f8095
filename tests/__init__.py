"""twinlm test suite: tests/weights (the checkpoint format), tests/twins (the two twins against
each other and against witnesses), tests/parity (the parity suite and the CLI), tests/vq
(Transformer-VQ); shared builders and runners in tests/helpers."""
