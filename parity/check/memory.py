"""How much memory a check needs, and the choice between the whole-model and the streamed check.

The whole-model check holds both twins' parameters, and with gradients the Flax twin's gradients
(torch's are compared and freed as its backward pass produces them), plus every layer's
activations and attention maps. The streamed check holds the embedding and head of both twins
and one decoder layer of each (with its gradients), whatever the depth. Both estimates add the
runtime (torch, JAX, compiled code) measured on this project's machine; `choose_mode` compares
the whole-model estimate with a budget and is a pure function, so it is tested without filling
any machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["BUDGET_FRACTION", "Mode", "ModelSizes", "available_bytes", "choose_mode", "default_budget",
           "format_bytes", "model_sizes", "streamed_bytes", "whole_model_bytes"]

# The share of MemAvailable a check may plan to use by default: the rest is headroom for the
# estimate's error and for whatever else runs on the machine.
BUDGET_FRACTION = 0.7
# torch + JAX + XLA's compiled code and buffers, independent of the model: measured about
# 0.9 GB for a TinyLlama-shaped check on CPU (see README, Benchmarks).
RUNTIME_BYTES = 1_000_000_000

_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of one twin."""

    total: int  # every parameter
    layer: int  # the largest decoder layer
    shell: int  # embedding + final norm + head: what a streamed check loads besides the layers
    embedding: int  # the token embedding, which a streamed check keeps until its last gradient
    largest: int  # the largest single tensor (the embedding or the LM head, usually)


def model_sizes(config: Any, head: str) -> ModelSizes:
    """Counts from the torch twin built on the meta device (shapes only: no memory, any size)."""
    import torch

    import torch_impl

    from ..inputs import HEADS

    with torch.device("meta"):
        model = getattr(torch_impl, HEADS[head])(config)
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    total = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    return ModelSizes(total, max(layers, default=0), total - sum(layers), model.model.embed_tokens.weight.numel(),
                      largest)


def _activation_bytes(config: Any, batch: int, seq_len: int, itemsize: int, layers: int) -> int:
    """One twin's hidden states, attention maps and logits over `layers` layers."""
    hidden = (layers + 1) * batch * seq_len * config.hidden_size
    attention = layers * batch * config.num_attention_heads * seq_len * seq_len
    logits = batch * seq_len * config.vocab_size * 2  # the loss's float32 copy besides them
    return (hidden + attention + logits) * itemsize


def whole_model_bytes(config: Any, head: str, dtype: str, *, gradients: bool, batch: int, seq_len: int,
                      sizes: ModelSizes | None = None) -> int:
    """Estimated peak of the whole-model check: both twins' parameters, the Flax gradients and
    one torch gradient in flight, and both twins' activations (three times over with gradients:
    kept for the backward pass, and their gradients)."""
    sizes = sizes or model_sizes(config, head)
    item = _ITEMSIZE[dtype]
    params = sizes.total * item
    grads = (params + sizes.largest * item) if gradients else 0
    acts = 2 * _activation_bytes(config, batch, seq_len, item, config.num_hidden_layers) * (3 if gradients else 1)
    return RUNTIME_BYTES + 2 * params + grads + acts


# A layer's backward pass holds the layer in each twin, torch's gradients, the Flax chained and
# isolated gradients (5 copies), plus the float32 copies made from the bf16 checkpoint, jax.vjp's
# residuals and XLA's temporaries: 7 in all, measured (bench `check` / `check7b`, float32: 2.69 GB
# for TinyLlama-1.1B, 7.73 GB for Llama-2-7B, whose layers are 4.6x larger; 3 copies estimated
# 5.1 GB for the latter).
_BACKWARD_LAYERS = 7


def streamed_bytes(config: Any, head: str, dtype: str, *, gradients: bool, batch: int, seq_len: int,
                   sizes: ModelSizes | None = None) -> int:
    """Estimated peak of the streamed check, the larger of its two busiest moments:
    - the head: both twins' embedding, norm and head, one decoder layer, and with gradients the
      head's gradient in torch and in Flax;
    - a layer's backward pass (the head freed): both twins' embeddings, and one layer
      `_BACKWARD_LAYERS` times;
    plus one layer's activations (twice the batch: chained and isolated inputs)."""
    sizes = sizes or model_sizes(config, head)
    item = _ITEMSIZE[dtype]
    layer = sizes.layer * item
    head_phase = 2 * sizes.shell * item + layer + (2 * sizes.largest * item if gradients else 0)
    backward = 2 * sizes.embedding * item + _BACKWARD_LAYERS * layer if gradients else 0
    acts = 2 * _activation_bytes(config, 2 * batch, seq_len, item, 1) * (3 if gradients else 1)
    return RUNTIME_BYTES + max(head_phase, backward) + acts


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), or None off Linux."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_budget() -> tuple[int | None, str]:
    """`(budget, how it was set)`: `BUDGET_FRACTION` of MemAvailable, or None when unknown."""
    available = available_bytes()
    if available is None:
        return None, "available memory unknown"
    return int(available * BUDGET_FRACTION), f"{BUDGET_FRACTION:.0%} of available {format_bytes(available)}"


def format_bytes(n: float) -> str:
    """`15.6 GB`, `850 MB` (decimal units, as `free -h` prints them off by 7%: stated exactly)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@dataclass(frozen=True)
class Mode:
    """Which check runs, and why (what `twinlm check` prints before loading)."""

    streamed: bool
    reason: str
    estimate: int  # bytes, the whole-model check's estimated peak
    budget: int | None  # bytes, or None when unknown

    def describe(self) -> str:
        """One line: `streamed, layer by layer: whole-model estimate 15.8 GB > budget 10.9 GB (...)`."""
        return ("streamed, layer by layer" if self.streamed else "whole model") + f": {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def choose_mode(estimate: int, budget: int | None, force: bool | None = None, budget_note: str = "") -> Mode:
    """Stream when the whole-model `estimate` exceeds `budget` (bytes), unless `force` says which
    (True: `--stream`, False: `--no-stream`). An unknown budget never streams by itself."""
    note = f" ({budget_note})" if budget_note else ""
    against = "no memory budget known" if budget is None else \
        f"whole-model estimate {format_bytes(estimate)} {'>' if estimate > budget else '<='} " \
        f"budget {format_bytes(budget)}{note}"
    if force is not None:
        return Mode(force, f"{'--stream' if force else '--no-stream'} ({against})", estimate, budget)
    return Mode(budget is not None and estimate > budget, against, estimate, budget)
