"""The numpy halves shared by both twins: computed once here so both twins get bit-identical
inputs; not the checkpoint format.

- `rope`: the rotary frequencies (float64, rounded once by each twin to its compute dtype);
- `generation`: what both `generate()`s share: argument checks, options, length buckets,
  position ids, and all the randomness of sampling (`sampling_noise`).
"""
