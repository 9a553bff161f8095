"""Both twins of one model with the same weights: from a checkpoint directory (`load_twins`, the
parity commands) or from a config (`twins_from_config`: the torch twin's seeded HF init copied
into the Flax twin through the `weights/` name and layout rules, the path a checkpoint takes).

Everything a user can get wrong about a checkpoint (missing directory, bad `config.json`,
truncated or lying safetensors, tensors that do not fit the config) surfaces here as one
`BadInputError` with a readable message: the CLI turns it into exit code 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from weights.config import ConfigError, ModelConfig
from weights.dtypes import FLOAT_DTYPES
from weights.errors import LOAD_ERRORS

from .inputs import HEADS

__all__ = ["BadInputError", "checkpoint_head", "DTYPES", "Twins", "abstract_flax_model", "copy_weights", "detect_head",
           "fill_flax_model", "inspect_checkpoint", "jax_dtype", "load_flax", "load_torch", "load_twins", "read_config",
           "torch_dtype", "twins_from_config"]

DTYPES = tuple(FLOAT_DTYPES)  # the dtype names of `weights.dtypes`


class BadInputError(Exception):
    """The checkpoint or an argument cannot be used; the message says which and why."""


@dataclass
class Twins:
    """One checkpoint loaded into both twins."""

    config: ModelConfig
    head: str  # a key of `parity.inputs.HEADS` (or a twin class name, e.g. "DecoderModel")
    torch_model: Any  # torch_impl.For...
    flax_model: Any  # flax_impl.For...
    dtype: str  # activations
    directory: Path
    param_dtype: str | None = None  # stored parameters; None: as `dtype`

    @property
    def pair(self) -> tuple[Any, Any]:
        """(torch model, Flax model)."""
        return self.torch_model, self.flax_model


def torch_dtype(name: str) -> Any:
    """torch dtype for a dtype name of `DTYPES` (the torch twin's table; imported on use, so
    this module loads without torch)."""
    from torch_impl.layers.precision import to_dtype

    return to_dtype(name)


def jax_dtype(name: str) -> Any:
    """jax dtype for a dtype name of `DTYPES` (the Flax twin's table; imported on use)."""
    from flax_impl.layers.precision import to_dtype

    return to_dtype(name)


def detect_head(config: ModelConfig, tensor_names: list[str] | None = None) -> str:
    """The head a checkpoint was saved with: from `architectures` in config.json (e.g.
    `LlamaForSequenceClassification`), else from the head's tensors, else causal LM
    (`weights.shapes.detect_head`, the converter's rule too)."""
    from weights.shapes import detect_head as detect

    return detect(config, tensor_names or ())


# What reading a checkpoint may raise on bad input: the documented checkpoint and config errors,
# and the OS's own (permissions, a directory where a file should be).
_INPUT_ERRORS: tuple[type[Exception], ...] = LOAD_ERRORS + (OSError,)


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """`config.json` of `directory`, or `BadInputError` saying what is wrong with it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInputError(f"{directory}: checkpoint directory not found")
    try:
        return ModelConfig.from_pretrained(directory)
    except ConfigError as e:
        raise BadInputError(str(e)) from None


def checkpoint_head(directory: str | os.PathLike, head: str | None = None) -> tuple[ModelConfig, str]:
    """`(config, head)` of a checkpoint directory, reading no weights: `head` when given (checked),
    else `detect_head`'s answer. Raises `BadInputError` naming what is wrong."""
    config = read_config(directory)
    head = head or detect_head(config, _tensor_names(directory))
    if head not in HEADS:
        raise BadInputError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    return config, head


def inspect_checkpoint(directory: str | os.PathLike, dtype: str, head: str | None = None, *,
                       twins: int = 1, allow_nonfinite: bool = False) -> tuple[ModelConfig, str]:
    """`(config, head)` of `directory`, after every check that needs no model: the header fits
    the config (`weights.shapes.check_fits`, milliseconds whatever the config says), `twins`
    copies of the weights in `dtype` fit in memory (`twins=0`: not checked here, as for the
    layer-streamed check, which holds one layer at a time), and no weight is NaN or infinite (unless
    `allow_nonfinite`: for comparing models known to be broken). Raises `BadInputError`."""
    from weights.checkpoint import CheckpointReader
    from weights.errors import NonFiniteWeightsError
    from weights.finite import scan_nonfinite
    from weights.shapes import check_fits, check_memory, parameter_totals

    if dtype not in DTYPES:
        raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = read_config(directory)
    try:
        with CheckpointReader(directory) as reader:
            head = head or detect_head(config, list(reader.keys()))
            if head not in HEADS:
                raise BadInputError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
            check_fits(reader, config, head)
            if twins:
                check_memory(twins * parameter_totals(config, head)[1] * FLOAT_DTYPES[dtype].itemsize,
                             f"{twins} twin(s) of this {config.model_type} model in {dtype}", source=directory)
            if not allow_nonfinite:
                bad = scan_nonfinite(reader)
                if bad:
                    raise NonFiniteWeightsError(bad, file=directory)
    except _INPUT_ERRORS as e:
        raise BadInputError(" ".join(str(e).split())) from None
    return config, head


def load_torch(directory: str | os.PathLike, dtype: str, head: str | None = None, *,
               param_dtype: str | None = None, device: Any = None, allow_nonfinite: bool = False) -> Any:
    """The torch twin of the checkpoint's head (`from_pretrained`) on `device` (default: CPU),
    activations in `dtype`, parameters in `param_dtype` (default: `dtype`), after
    `inspect_checkpoint`."""
    import torch_impl

    _, head = inspect_checkpoint(directory, param_dtype or dtype, head, allow_nonfinite=allow_nonfinite)
    return _from_pretrained(getattr(torch_impl, HEADS[head]), directory, dtype=dtype, param_dtype=param_dtype,
                            device=device).eval()


def load_flax(directory: str | os.PathLike, dtype: str, head: str | None = None, *,
              param_dtype: str | None = None, device: Any = None, precision: str = "highest",
              allow_nonfinite: bool = False) -> Any:
    """The Flax twin of the checkpoint's head (`from_pretrained`) on the `jax.Device` `device`
    (default: JAX's default), activations in `dtype`, parameters in `param_dtype` (default:
    `dtype`), every dot at the matmul `precision`, after `inspect_checkpoint`. `directory` may be
    in HF layout or in twinlm's Flax layout (`twinlm convert --layout flax`)."""
    import flax_impl

    _, head = inspect_checkpoint(directory, param_dtype or dtype, head, allow_nonfinite=allow_nonfinite)
    return _from_pretrained(getattr(flax_impl, HEADS[head]), directory, dtype=dtype, param_dtype=param_dtype,
                            device=device, precision=precision)


def _from_pretrained(cls: Any, directory: str | os.PathLike, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(directory, **kwargs)
    except _INPUT_ERRORS as e:
        raise BadInputError(" ".join(str(e).split())) from None
    except (MemoryError, RuntimeError) as e:
        # An allocation the memory estimate did not foresee (the machine's other tenants): say so
        # in one line rather than a traceback. Other RuntimeErrors are bugs and propagate.
        if isinstance(e, MemoryError) or "alloc" in str(e).lower() or "RESOURCE_EXHAUSTED" in str(e):
            raise BadInputError(f"{directory}: out of memory building the {cls.__name__} "
                                f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
        raise


def abstract_flax_model(config: ModelConfig, head: str, dtype: str, param_dtype: str | None = None) -> Any:
    """A Flax twin whose parameters are shapes only (`nnx.eval_shape`): the random init is
    traced, never run, so nothing is allocated or compiled until real weights are loaded. In
    inference mode (`.eval()`), like the torch twin beside it. `head` is a key of `HEADS` or a class name (`ForCausalLM`, ..., `DecoderModel`)."""
    from flax import nnx

    import flax_impl

    cls = getattr(flax_impl, HEADS.get(head, head))
    model = nnx.eval_shape(lambda: cls(config, dtype=jax_dtype(dtype), param_dtype=jax_dtype(param_dtype or dtype),
                                       rngs=nnx.Rngs(0)))
    model.eval()  # inference mode (dropout off), as the torch twins' .eval()
    return model


def fill_flax_model(model: Any, tensors: Mapping[str, np.ndarray]) -> None:
    """Give a (possibly abstract) Flax twin its weights from HF-named numpy arrays, each cast
    to its parameter's dtype; linear kernels are the transposed HF weights. Every parameter
    must be present, and no extra tensor (raises KeyError / ValueError naming them)."""
    from flax_impl.checkpoint import load_numpy_state

    load_numpy_state(model, tensors)


def copy_weights(source: Any, target: Any) -> None:
    """torch module -> Flax module of the same class, through the HF name/layout rules."""
    from torch_impl.checkpoint import state_to_numpy

    fill_flax_model(target, state_to_numpy(source))


def twins_from_config(config: ModelConfig, head: str = "causal_lm", dtype: str = "float64",
                      seed: int = 0, param_dtype: str | None = None) -> Twins:
    """Both twins of a config with the torch twin's seeded HF init, copied into the Flax twin
    through the HF names (the path a checkpoint takes, without the disk). `head` is a key of
    `HEADS` or a class name (`ForCausalLM`, ..., `DecoderModel`); `.pair` is (torch, Flax).
    Activations in `dtype`, parameters in `param_dtype` (default: `dtype`)."""
    import torch

    import torch_impl
    from weights.shapes import check_memory, parameter_totals

    if head in HEADS or head in HEADS.values():
        try:
            check_memory(2 * parameter_totals(config, head)[1] * FLOAT_DTYPES[dtype].itemsize,
                         f"both twins of this config in {dtype}")
        except LOAD_ERRORS as e:
            raise BadInputError(str(e)) from None
    torch.manual_seed(seed)
    t_model = getattr(torch_impl, HEADS.get(head, head))(
        config, dtype=torch_dtype(dtype), param_dtype=torch_dtype(param_dtype or dtype)).eval()
    f_model = abstract_flax_model(config, head, dtype, param_dtype)
    copy_weights(t_model, f_model)
    return Twins(config, head, t_model, f_model, dtype, Path("."), param_dtype)


def load_twins(directory: str | os.PathLike, dtype: str = "float32", head: str | None = None,
               flax_directory: str | os.PathLike | None = None, *, param_dtype: str | None = None,
               device: Any = None, jax_device: Any = None, precision: str = "highest",
               allow_nonfinite: bool = False) -> Twins:
    """Load `directory` into both twins, activations in `dtype` and parameters in `param_dtype`
    (default: `dtype`): the torch twin onto `device` (a `torch.device`; default CPU), the Flax
    twin onto `jax_device` (default: JAX's default) with every dot at the matmul `precision`,
    from `flax_directory` when given (e.g. the same checkpoint in twinlm's Flax layout).
    Everything `inspect_checkpoint` checks is refused before either twin is built."""
    if dtype not in DTYPES:
        raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    # The parameters are what the memory holds: checked in the dtype they are stored in.
    config, head = inspect_checkpoint(directory, param_dtype or dtype, head, twins=2, allow_nonfinite=allow_nonfinite)
    if flax_directory is not None:
        inspect_checkpoint(flax_directory, param_dtype or dtype, head, allow_nonfinite=allow_nonfinite)
    import flax_impl
    import torch_impl

    t_model = _from_pretrained(getattr(torch_impl, HEADS[head]), directory, dtype=dtype, param_dtype=param_dtype,
                               device=device).eval()
    f_model = _from_pretrained(getattr(flax_impl, HEADS[head]), flax_directory or directory, dtype=dtype,
                               param_dtype=param_dtype, device=jax_device, precision=precision)
    return Twins(config, head, t_model, f_model, dtype, Path(directory), param_dtype)


def _tensor_names(directory: str | os.PathLike) -> list[str]:
    from weights.checkpoint import CheckpointReader

    try:
        with CheckpointReader(directory) as reader:
            return list(reader.keys())
    except _INPUT_ERRORS as e:
        raise BadInputError(" ".join(str(e).split())) from None
