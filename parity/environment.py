"""Where and how the twins run: devices, the matmul precision, library versions. A parity run
sets them for its duration (`run_environment`) and records them in its report, so a figure is
never read without the hardware and the precision that produced it.

Devices: the torch twin takes a `torch.device` ("cpu", "cuda", "cuda:1"); the Flax twin a
`jax.Device`, chosen by platform ("cpu", "gpu", "tpu"; default: JAX's default backend).
Precision: one mode for both twins, `highest` unless asked otherwise (see
`torch_impl/layers/precision.py` and `flax_impl/layers/precision.py` for what each mode means
in each framework, and what a bare `model(x)` does outside a parity run).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
from typing import Any, Iterator

__all__ = ["JAX_PLATFORMS", "MATMUL_PRECISIONS", "current_environment", "describe_jax_device",
           "describe_torch_device", "jax_device", "run_environment", "torch_device", "versions"]

MATMUL_PRECISIONS = ("highest", "tf32", "bf16x3")  # the twins' `layers/precision.py` hold the same tuple
JAX_PLATFORMS = ("cpu", "gpu", "tpu")


def versions() -> dict[str, str]:
    """Versions of what produces the numbers (python, numpy, torch, jax, jaxlib, flax, twinlm)."""
    out = {"python": platform.python_version()}
    for dist in ("numpy", "torch", "jax", "jaxlib", "flax", "twinlm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def torch_device(name: str | None) -> Any:
    """`torch.device` for "cpu", "cuda" or "cuda:N" (None: the CPU); a clear `ValueError` when
    this machine has no such device."""
    import torch

    name = name or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__}, "
                             f"built with CUDA {torch.version.cuda or 'none'})")
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def jax_device(platform_name: str | None) -> Any:
    """The first `jax.Device` of a platform ("cpu", "gpu", "tpu"; None: JAX's default device);
    a clear `ValueError` when JAX has no such backend here."""
    import jax

    if platform_name is None:
        return jax.local_devices()[0]
    if platform_name not in JAX_PLATFORMS:
        raise ValueError(f"--jax-platform: expected one of {', '.join(JAX_PLATFORMS)}, got {platform_name!r}")
    try:
        return jax.local_devices(backend=platform_name)[0]
    except RuntimeError:
        have = sorted({d.platform for d in jax.devices()})
        raise ValueError(f"--jax-platform {platform_name}: JAX (jaxlib {jax.lib.__version__}) has no {platform_name} "
                         f"backend here; it has: {', '.join(have)}") from None


def describe_torch_device(device: Any) -> str:
    """`cuda:0 (NVIDIA H100 80GB HBM3)`, or `cpu`."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def describe_jax_device(device: Any) -> str:
    """`gpu:0 (NVIDIA H100 80GB HBM3)`, or `cpu:0 (cpu)`."""
    return f"{device.platform}:{device.id} ({getattr(device, 'device_kind', device.platform)})"


def current_environment(torch_model: Any = None, flax_model: Any = None) -> dict[str, Any]:
    """What a report records about the run in progress: the twins' devices (where their first
    parameters live), each framework's matmul switches in force, the precision the Flax twin's
    dots carry, and library versions."""
    from flax import nnx

    from flax_impl.layers import precision as flax_precision
    from torch_impl.layers import precision as torch_precision

    devices, dots = {}, None
    if torch_model is not None:
        devices["torch"] = describe_torch_device(next(torch_model.parameters()).device)
    if flax_model is not None:
        _, var = next(iter(nnx.to_flat_state(nnx.state(flax_model, nnx.Param))))
        devices["flax"] = describe_jax_device(next(iter(var[...].devices())))
        dots = sorted({str(m.precision) for _, m in nnx.iter_modules(flax_model) if hasattr(m, "precision")})
    return {"devices": devices,
            "matmul_precision": {"torch": torch_precision.matmul_settings(), "flax": flax_precision.matmul_settings(),
                                 "flax_dots": ", ".join(dots) if dots else "n/a"},
            "versions": versions()}


@contextlib.contextmanager
def run_environment(matmul_precision: str = "highest", device: Any = None, jax_device_: Any = None
                    ) -> Iterator[dict[str, Any]]:
    """Run a block with both twins' matmul switches in `matmul_precision` and JAX's default device
    set to `jax_device_` (the torch device is only recorded: the caller places the model);
    everything is restored on exit. Yields the mode and devices, for a report."""
    import jax

    from flax_impl.layers import precision as flax_precision
    from torch_impl.layers import precision as torch_precision

    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"--matmul-precision: expected one of {', '.join(MATMUL_PRECISIONS)}, got {matmul_precision!r}")
    device = torch_device(None) if device is None else device
    jax_device_ = jax.local_devices()[0] if jax_device_ is None else jax_device_
    flax_precision.dot_precision(matmul_precision, "float32", jax_device_.platform)  # refuses tf32 on a TPU
    with (torch_precision.matmul_precision(matmul_precision),
          flax_precision.matmul_precision(matmul_precision),
          jax.default_device(jax_device_)):
        yield {"mode": matmul_precision,
               "devices": {"torch": describe_torch_device(device), "flax": describe_jax_device(jax_device_)}}
