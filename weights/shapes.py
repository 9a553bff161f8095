"""The tensors a config implies, computed from the config alone: no module is built.

`parameter_shapes(config, head)` is the HF name -> shape table of every parameter of both twins
(the same table `state_dict()` of the torch twin gives, tested for every family and head).
`parameter_totals(config, head)` is its tensor count and element count in closed form, O(1)
whatever the layer count, so a checkpoint whose header disagrees with its config is refused in
microseconds (`check_fits`) before a module, or anything of its size, is allocated. Only once the
totals agree is the table enumerated (its size is then bounded by the header's) and matched
name by name.

Heads are named as in `weights.names.HEADS` (`causal_lm`, `sequence_classification`,
`question_answering`) or by class name (`ForCausalLM`, ...).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from .config import ModelConfig
from .dtypes import FLOAT_DTYPES
from .errors import ConfigMismatchError, MemoryLimitError
from .names import HEADS, hf_shapes
from .report import LM_HEAD_KEY, match_state

__all__ = ["HEAD_CLASSES", "detect_head", "head_key", "parameter_shapes", "parameter_totals", "checkpoint_totals",
           "check_fits", "check_memory", "memory_limit"]

HEAD_CLASSES = {cls: key for key, cls in HEADS.items()}  # "ForCausalLM" -> "causal_lm"


def head_key(head: str) -> str:
    """`causal_lm` for `causal_lm` or `ForCausalLM` (and so on); ValueError for anything else."""
    if head in HEADS:
        return head
    if head in HEAD_CLASSES:
        return HEAD_CLASSES[head]
    raise ValueError(f"unknown head {head!r}; one of {', '.join(HEADS)}")


def detect_head(config: ModelConfig, tensor_names: Any = ()) -> str:
    """The head a checkpoint was saved with: from `architectures` in config.json (e.g.
    `LlamaForSequenceClassification`), else from the head's tensors, else causal LM."""
    for arch in config.architectures or ():
        for cls, head in HEAD_CLASSES.items():
            if arch.endswith(cls):
                return head
    names = set(tensor_names or ())
    if "score.weight" in names:
        return "sequence_classification"
    if "qa_outputs.weight" in names:
        return "question_answering"
    return "causal_lm"


def parameter_shapes(config: ModelConfig, head: str = "causal_lm") -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every parameter of `head` on `config` (`weights.names.hf_shapes`; a
    tied LM head is not a parameter of its own). O(layers x tensors per layer): call
    `parameter_totals` first when the config is untrusted."""
    return hf_shapes(config, head_key(head))


def parameter_totals(config: ModelConfig, head: str = "causal_lm") -> tuple[int, int]:
    """(tensor count, element count) of `parameter_shapes(config, head)`, in O(tensors per layer)
    whatever the layer count: the table of a one-layer copy of the config, its layer counted
    `num_hidden_layers` times."""
    one = hf_shapes(dataclasses.replace(config, num_hidden_layers=1, layer_types=None), head_key(head))
    layer = [math.prod(shape) for name, shape in one.items() if ".layers.0." in name]
    outside = [math.prod(shape) for name, shape in one.items() if ".layers.0." not in name]
    n = config.num_hidden_layers
    return len(outside) + n * len(layer), sum(outside) + n * sum(layer)


def checkpoint_totals(reader: Any, config: ModelConfig) -> tuple[int, int, int]:
    """(tensor count, element count, bytes) of what a checkpoint holds for the model: rotary
    `inv_freq` buffers left out, and a tied LM head saved as its own tensor counted once (it
    must equal the embedding, which the strict match checks)."""
    count = elements = nbytes = 0
    for name in reader.keys():
        if name.endswith(".inv_freq") or (config.tie_word_embeddings and name == LM_HEAD_KEY):
            continue
        count += 1
        elements += math.prod(reader.shape(name))
        nbytes += reader.nbytes(name)
    return count, elements, nbytes


def check_fits(reader: Any, config: ModelConfig, head: str = "causal_lm", *, source: Any = None) -> None:
    """Refuse a checkpoint whose tensors disagree with what `config` implies, before anything
    of the model's size exists: first the totals (closed form: microseconds, whatever the layer
    count), then every name, shape and dtype kind (a `StateMismatchError` listing them).

    Raises `ConfigMismatchError` naming both totals and the config fields they come from.
    """
    source = source if source is not None else getattr(reader, "directory", None)
    want_count, want_elements = parameter_totals(config, head)
    count, elements, _ = checkpoint_totals(reader, config)
    # Name by name when the config's table and the header are within about twice each other (an
    # honest mistake: the precise list helps); from the totals alone beyond (a hostile or mistyped
    # size, or a million junk tensors: matching millions of names is what this check prevents).
    if (count, elements) != (want_count, want_elements) and max(want_count, count) > 2 * min(want_count, count) + 16:
        raise ConfigMismatchError(
            f"the checkpoint does not fit config.json: the config implies {want_count} tensors of "
            f"{want_elements} parameters in all ({head_key(head)}, {config.num_hidden_layers} layers, width "
            f"{config.hidden_size}, vocab {config.vocab_size}), the checkpoint holds {count} tensors of "
            f"{elements} parameters", file=source)
    # Parameters are floats: the kind is what matching checks (an int32 tensor is a mismatch); the
    # messages show the checkpoint's own float dtype.
    counts: dict[np.dtype, int] = {}
    for n in reader.keys():
        dt = np.dtype(reader.dtype(n))
        counts[dt] = counts.get(dt, 0) + 1
    floats = {dt: c for dt, c in counts.items() if dt in FLOAT_DTYPES.values()}
    dtype = max(floats, key=floats.__getitem__) if floats else np.dtype(np.float32)
    expected = {name: (shape, dtype) for name, shape in parameter_shapes(config, head).items()}
    match_state(expected, reader, tie_word_embeddings=config.tie_word_embeddings, strict=True,
                file=None if source is None else os.fspath(source))


def memory_limit() -> int | None:
    """Bytes this process can ever hold: the smaller of physical memory (+ swap) and RLIMIT_AS;
    None where neither can be read."""
    limits = []
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and size > 0:
            limits.append(pages * size + _swap_bytes())
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(soft)
    except (ImportError, ValueError, OSError):
        pass
    return min(limits) if limits else None


def _swap_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("SwapTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def check_memory(nbytes: int, what: str, *, source: Any = None) -> None:
    """Refuse work that needs more than this machine can ever hold (`memory_limit`): a clear
    error up front instead of an allocator failure, or the OOM killer, half way through."""
    limit = memory_limit()
    if limit is not None and nbytes > limit:
        raise MemoryLimitError(f"{what} needs {nbytes / 1e9:.3g} GB, more than this process can hold "
                               f"({limit / 1e9:.3g} GB: physical memory + swap, or RLIMIT_AS)", file=source)
