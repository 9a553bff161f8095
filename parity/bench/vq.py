"""Transformer-VQ benchmark: forward time per token at 1k, 4k and 16k tokens, both twins, next to
the LLaMA core's full attention at the same width; the growth ratios are the point.

Transformer-VQ is linear in the sequence length: each block of L queries attends to a window of
M + L keys and C compressed codes, so the cost per token should not grow with the length (goal:
16k within 1.3x of 1k). Full attention's per-token cost grows linearly with the length.

The `vq` section of `make bench` (`python -m parity.bench vq`). Never imported by the tests.
"""

from __future__ import annotations

from typing import Callable

from parity.bench import Row, best, section

__all__ = ["VQ_BENCH", "LENGTHS", "bench_vq"]

LENGTHS = (1024, 4096, 16384)
# Fixed block length and mem_len; width 256 for both models, float32, batch 1, eval mode.
VQ_BENCH = dict(param_dtype="float32", dtype="float32", d_model=256, d_k=64, d_v=512, n_head=1,
                n_code=256, n_layer=2, n_vocab=256, block_len=256, mem_len=256, sequence_len=1024,
                update_len=1024, pe_abs=True, is_train=False)
LLAMA_BENCH = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=16384)


def _vq_runners(length: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from flax_impl.vq import Transformer as FTransformer
    from flax_impl.vq import checkpoint as fckpt
    from torch_impl.vq import Transformer as TTransformer
    from torch_impl.vq import checkpoint as tckpt
    from weights.vq.config import TransformerVQConfig

    config = TransformerVQConfig(**VQ_BENCH)
    torch.manual_seed(0)
    t_model = TTransformer(config).eval()
    f_model = fckpt.load_numpy(fckpt.abstract_model(config), tckpt.to_numpy(t_model))
    ids = np.random.default_rng(0).integers(0, config.n_vocab, (1, length))
    t_ids, j_ids = torch.from_numpy(ids), jnp.asarray(ids)

    def run_torch():
        with torch.inference_mode():
            return t_model(t_ids, TTransformer.initial_state(config, 1), None, is_train=False)["logprobs"]

    graphdef, state = nnx.split(f_model)
    # Under jit the blocks run under jax.lax.scan: one compiled body whatever the length.
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, FTransformer.initial_state(config, 1), None,
                                                          is_train=False)["logprobs"])

    def run_flax():
        return forward(state, j_ids).block_until_ready()

    return run_torch, run_flax


def _llama_runners(length: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    import flax_impl.model as fmodel
    import torch_impl.model as tmodel
    from weights.config import ModelConfig

    config = ModelConfig(**LLAMA_BENCH)
    t_model = tmodel.DecoderModel(config).eval()
    f_model = fmodel.DecoderModel(config, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, length))
    t_ids, j_ids = torch.from_numpy(ids), jnp.asarray(ids)

    def run_torch():
        with torch.inference_mode():
            return t_model(t_ids)

    graphdef, state = nnx.split(f_model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).last_hidden_state)

    def run_flax():
        return forward(state, j_ids).block_until_ready()

    return run_torch, run_flax


def _per_token(runner: Callable[[], object], length: int) -> float:
    runner()  # warm-up (and compile, for Flax)
    return best(runner, 3) / length


@section("vq")
def bench_vq() -> list[Row]:
    """Per-token forward time of Transformer-VQ and of full attention at 1k / 4k / 16k tokens."""
    rows: list[Row] = []
    results: dict[tuple[str, str], dict[int, float]] = {}
    for model, make in (("transformer-vq", _vq_runners), ("llama full attention", _llama_runners)):
        for length in LENGTHS:
            runners = make(length)
            for twin, runner in zip(("torch", "flax"), runners):
                key = (model, twin)
                try:
                    seconds = _per_token(runner, length)
                except (MemoryError, RuntimeError) as e:  # 16k x 16k scores may not fit
                    rows.append(Row("vq", f"{model} {twin} {length // 1024}k", f"skipped: {type(e).__name__}"))
                    continue
                results.setdefault(key, {})[length] = seconds
                rows.append(Row("vq", f"{model} {twin} {length // 1024}k tokens", f"{seconds * 1e6:.1f} us/token"))
    for (model, twin), by_len in results.items():
        base = by_len.get(LENGTHS[0])
        for length in LENGTHS[1:]:
            if base and length in by_len:
                ratio = by_len[length] / base
                is_vq = model == "transformer-vq" and length == LENGTHS[-1]
                rows.append(Row("vq", f"{model} {twin} per-token growth {length // 1024}k / 1k", f"{ratio:.2f}x",
                                "<= 1.30x" if is_vq else "", ratio <= 1.3 if is_vq else None))
    return rows

