"""`twinlm generate`: text in, text out, streamed, through either twin's serving `Runner`.

The checkpoint directory's tokenizer (`tokenizer.json` or `tokenizer.model`,
`weights.tokenizer.load_tokenizer`) encodes the prompt; a one-slot runner decodes, and each token
is printed as soon as it comes (`StreamDecoder`: the text it completes). Without a tokenizer,
`prompt_ids` gives the prompt as token ids and the ids are printed instead.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from weights.shared.generation import bucket_length
from weights.shared.serving import Request, TokenEvent
from weights.tokenizer import StreamDecoder, load_tokenizer

from ..loading import BadInputError, detect_head, load_flax, load_torch, read_config

__all__ = ["generate_text"]


def generate_text(directory: str | os.PathLike, prompt: str | None = None, *, prompt_ids: Sequence[int] | None = None,
                  framework: str = "torch", dtype: str = "float32", max_new_tokens: int = 32, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                  filter_order: str = "generate", stop_at_eos: bool = True,
                  write: Callable[[str], None] = print) -> list[TokenEvent]:
    """Continue `prompt` (text; or `prompt_ids`) with the checkpoint in `directory`, writing each
    piece of text (or each token id) through `write` as it comes. Returns the token events.

    The stop tokens are the config's eos tokens unless `stop_at_eos` is False. When the
    tokenizer knows fewer ids than the model's vocabulary (a small demo tokenizer on a model
    with room to spare), the model may only emit ids the tokenizer can decode."""
    config = read_config(directory)
    if detect_head(config) != "causal_lm":
        raise BadInputError(f"{directory}: `generate` needs a causal LM checkpoint (this one's head: "
                            f"{detect_head(config)})")
    tokenizer = load_tokenizer(directory)
    if prompt_ids is None:
        if tokenizer is None:
            raise BadInputError(f"{directory}: no tokenizer.json or tokenizer.model to encode the prompt; "
                                "give the prompt as token ids (--prompt-ids)")
        ids = tokenizer.encode(prompt or "")
    else:
        ids = [int(i) for i in prompt_ids]
    if not ids:
        raise BadInputError("prompt: empty (the tokenizer produced no token)")
    allowed = None
    if tokenizer is not None and tokenizer.vocab_size < config.vocab_size:
        allowed = np.arange(config.vocab_size) < tokenizer.vocab_size
    eos = config.eos_token_id if stop_at_eos else None
    stop = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    request = Request(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                      top_p=top_p, allowed_tokens=allowed, stop_tokens=stop, seed=seed, filter_order=filter_order)
    bucket = bucket_length(len(ids))
    if framework == "torch":
        from torch_impl.serving import Runner

        model = load_torch(directory, dtype, "causal_lm")
    else:
        from flax_impl.serving import Runner

        model = load_flax(directory, dtype, "causal_lm")
    max_len = max(bucket, len(ids) + max_new_tokens)
    # One request: attending over the whole cache costs less than compiling a decode step per key bucket.
    runner = Runner(model, 1, max_len, (bucket,), key_buckets=(max_len,), tokenizer=tokenizer,
                    progress=framework == "flax")
    stream = StreamDecoder(tokenizer) if prompt_ids is None else None
    events = []
    for event in runner.run([request]):
        events.append(event)
        write(stream.push(event.token) if stream else f"{event.token} ")
    if stream:
        write(stream.flush())
    return events
