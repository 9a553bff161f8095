"""`TransformerVQConfig`: the configuration of Transformer-VQ (Lingle, ICLR 2024).

One frozen dataclass with every field of the reference `TransformerConfig`
(transformer-vq/transformer_vq main@21943e4, `nn/types.py`), saved as `config.json` with
`model_type: "transformer_vq"`. The reference's four initializers are not fields: its
`TransformerConfig.create` always overwrites them, so they are fixed in the twins
(embeddings N(0, 1); projections and `c_sum` an untruncated normal with std 1/sqrt(fan_in);
biases, `u`, `v` and the ScaledSin scale zeros).

Dtypes are stored as strings ("float32", "float64", "bfloat16", "float16") so the config stays
hashable and framework-neutral; each twin maps them to its own dtype objects.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from weights.dtypes import FLOAT_DTYPES
from weights.errors import ConfigError
from weights.hf_config import read_config_json, write_config_json

__all__ = ["TransformerVQConfig", "VQ_MODEL_TYPE", "VQ_DTYPES"]

VQ_MODEL_TYPE = "transformer_vq"
VQ_DTYPES: tuple[str, ...] = tuple(FLOAT_DTYPES)  # the names of `weights.dtypes`


@dataclass(frozen=True)
class TransformerVQConfig:
    """Hyper-parameters of Transformer-VQ, with the reference's field names.

    Construction validates every rule and raises `ConfigError` naming the field. Param shapes do
    not depend on `block_len`, `mem_len`, `sequence_len` or `update_len`: one set of weights runs
    with any block length that divides the sequence.
    """

    param_dtype: str = "float32"  # dtype of params, q, k, k_hat, the codebook and all attention scores
    dtype: str = "float32"  # activation dtype: dense compute, v, g, softmax weights, aggcache, losses
    global_batch_size: int = 8  # training batch (all devices); used by the training loop only
    sequence_len: int = 512  # T: tokens per training/eval sequence; state is reset per sequence
    update_len: int = 256  # tokens per optimizer step (truncated BPTT chunk); divides sequence_len
    block_len: int = 128  # L: tokens processed in parallel per recurrent step; divides the sequence
    mem_len: int = 128  # M: length of the uncompressed sliding cache (xlcache); >= 1
    grad_thru_cache: bool = True  # let gradients flow through the carried state within an update
    agg_cache: bool = True  # attend to the compressed (aggregated) cache of evicted keys
    d_model: int = 256  # E: residual width; even (sinusoid width)
    d_k: int = 64  # key/query width per head
    d_v: int = 512  # value/gate width per head (2 * d_model in the paper)
    d_ff: int = 0  # unused by the reference's main branch (no MLP); kept for config round trips
    n_head: int = 1  # H: heads, each with its own codebook (1 in every reference script)
    n_code: int = 512  # C: codebook size per head, also the size of the compressed cache
    n_layer: int = 4  # layers, each with two VQ-attention (GAU) sublayers
    n_vocab: int = 256  # V: vocabulary size
    pe_abs: bool = False  # add ScaledSin absolute position embeddings to the token embeddings
    pe_lam: float = 100000.0  # lambda: maximum angular wavelength of all sinusoids
    p_dropemb: float = 0.0  # dropout after embedding (+ abs PE), fresh per call
    p_dropsin: float = 0.0  # dropout on the relative sinusoid table, shared by all blocks
    p_dropres: float = 0.0  # dropout on each sublayer's output projection, fresh per block
    p_droplyr: float = 0.0  # LayerDrop: drop a whole sublayer per batch element, shared by blocks
    p_nucleus: float = 0.9  # nucleus-sampling p, used by sampling only
    c_beta: float = 1e-4  # commitment-loss coefficient beta
    c_gamma: float = 0.99  # codebook EMA decay gamma
    e_tie: bool = True  # tie the output projection to the input embeddings
    e_preln: bool = True  # RMS-LayerNorm before the logits
    e_scale: float = 1.0  # multiplier on the logits, after the output bias, before log_softmax
    is_train: bool = True  # train mode: dropout on, commit/codebook losses and metrics computed
    no_emb: bool = False  # inputs are float features [B, P, E] instead of token ids
    model_type: str = VQ_MODEL_TYPE  # written to config.json; must be "transformer_vq"

    def __post_init__(self) -> None:
        self.validate()

    def replace(self, **changes: Any) -> "TransformerVQConfig":
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------------
    def validate(self, source: str | None = None) -> None:
        """Raise `ConfigError` naming the first field that breaks a rule."""

        def fail(name: str, msg: str) -> None:
            raise ConfigError(name, msg, source=source)

        if self.model_type != VQ_MODEL_TYPE:
            fail("model_type", f"must be {VQ_MODEL_TYPE!r}, got {self.model_type!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in VQ_DTYPES:
                fail(name, f"unknown dtype {getattr(self, name)!r}; supported: {', '.join(VQ_DTYPES)}")
        for name in ("global_batch_size", "sequence_len", "update_len", "block_len", "mem_len",
                     "d_model", "d_k", "d_v", "n_head", "n_code", "n_layer", "n_vocab"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                # mem_len = 0 would make the state update's `[..., :-M]` slice empty
                fail(name, f"must be a positive integer, got {v!r}")
        if isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff < 0:
            fail("d_ff", f"must be a non-negative integer, got {self.d_ff!r}")
        if self.d_model % 2:
            fail("d_model", f"sinusoid features need an even width, got {self.d_model}")
        if self.update_len % self.block_len:
            fail("block_len", f"{self.block_len} does not divide update_len {self.update_len}")
        if self.sequence_len % self.update_len:
            fail("update_len", f"{self.update_len} does not divide sequence_len {self.sequence_len}")
        for name in ("grad_thru_cache", "agg_cache", "pe_abs", "e_tie", "e_preln", "is_train", "no_emb"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"must be a boolean, got {getattr(self, name)!r}")
        for name in ("p_dropemb", "p_dropsin", "p_dropres", "p_droplyr"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 <= v < 1.0:
                fail(name, f"must be a probability in [0, 1), got {v!r}")
        if not _is_number(self.p_nucleus) or not 0.0 < self.p_nucleus <= 1.0:
            fail("p_nucleus", f"must be in (0, 1], got {self.p_nucleus!r}")
        if not _is_number(self.c_gamma) or not 0.0 <= self.c_gamma <= 1.0:
            fail("c_gamma", f"must be in [0, 1], got {self.c_gamma!r}")
        for name in ("c_beta", "e_scale"):
            if not _is_number(getattr(self, name)):
                fail(name, f"must be a finite number, got {getattr(self, name)!r}")
        if not _is_number(self.pe_lam) or self.pe_lam <= 0:
            fail("pe_lam", f"must be a positive finite number, got {self.pe_lam!r}")

    def check_block_len(self, length: int, block_len: int) -> None:
        """Raise `ConfigError` unless `block_len` is positive and divides `length`."""
        if isinstance(block_len, bool) or not isinstance(block_len, int) or block_len <= 0:
            raise ConfigError("block_len", f"must be a positive integer, got {block_len!r}")
        if length % block_len:
            raise ConfigError("block_len", f"{block_len} does not divide the sequence length {length}")

    # ---- config.json ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The `config.json` mapping."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | None = None) -> "TransformerVQConfig":
        """Build from a parsed `config.json`; unknown keys are an error (they would be lost)."""
        if not isinstance(d, Mapping):
            raise ConfigError("<root>", f"config must be a JSON object, got {type(d).__name__}", source=source)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(unknown[0], "is not a Transformer-VQ config field", source=source)
        kwargs = dict(d)
        for name in ("pe_lam", "p_dropemb", "p_dropsin", "p_dropres", "p_droplyr", "p_nucleus",
                     "c_beta", "c_gamma", "e_scale"):
            if isinstance(kwargs.get(name), int) and not isinstance(kwargs.get(name), bool):
                kwargs[name] = float(kwargs[name])
        try:
            return cls(**kwargs)
        except ConfigError as e:
            if source is None:
                raise
            raise ConfigError(e.field, e.rule, source=source) from None
        except TypeError as e:
            raise ConfigError("<root>", f"invalid value type: {e}", source=source) from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "TransformerVQConfig":
        """Read `<directory>/config.json`."""
        d, source = read_config_json(directory)
        return cls.from_dict(d, source=source)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `<directory>/config.json` atomically (temporary file, then rename)."""
        return write_config_json(directory, self.to_dict())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
