"""`twinlm check --mesh data=2,tensor=4`: the parity check with the Flax twin cut over a device
mesh by its partition table (`flax_impl.sharding`), loaded sharded (each device reads its slice).

The rows are the unsharded check's — torch twin against the sharded Flax twin: every hidden
state, attention map, logits, loss, every gradient, KV-cache decoding and generation — plus the
sharded Flax twin against itself on one device (logits and loss): sharding may only reorder sums.
On CPU the devices are simulated (`--xla_force_host_platform_device_count`, set by the CLI before
JAX starts). The torch twin runs in one process here; its sharded runs need several processes
(`torchrun`, see the README) and are tested against one process in tests/twins/test_sharding.py.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

import flax_impl

from ..compare import compare
from ..inputs import HEADS, Batch
from ..loading import BadInputError, load_twins
from ..report import Report, Row
from .pair import check_pair, flax_forward
from .progress import Phases
from .rows import tolerance_for, to_jax

__all__ = ["check_sharded", "device_mesh"]


def device_mesh(axes: Mapping[str, int]) -> Mesh:
    """A `Mesh` of the first prod(sizes) devices, shaped and named as `axes` ({axis: size})."""
    count = math.prod(axes.values())
    devices = jax.devices()
    if len(devices) < count:
        raise BadInputError(f"--mesh {','.join(f'{a}={n}' for a, n in axes.items())} needs {count} devices; "
                            f"JAX sees {len(devices)} {devices[0].platform} device(s) (on CPU, set "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts)")
    return Mesh(np.asarray(devices[:count]).reshape(tuple(axes.values())), tuple(axes))


def check_sharded(directory: str | os.PathLike, dtype: str, batch: Batch, axes: Mapping[str, int], *,
                  head: str, sections: Iterable[str], title: str, tolerances: Mapping[str, float] | None = None,
                  phases: Phases | None = None) -> Report:
    """Both twins whole, the Flax twin also loaded sharded over `axes`; `check_pair` of torch
    against the sharded Flax twin, then the sharded Flax twin against the unsharded one."""
    mesh = device_mesh(axes)
    phases = phases or Phases(None)
    with phases("load", total=2, unit="model") as bar:
        twins = load_twins(directory, dtype, head, allow_nonfinite=True)  # checked by the caller
        bar.update()
        try:
            sharded = getattr(flax_impl, HEADS[head]).from_pretrained(directory, dtype=dtype, mesh=mesh)
        except ValueError as e:  # a dimension the mesh does not divide, named by the table
            raise BadInputError(" ".join(str(e).split())) from None
        bar.update()
    labels = {k: to_jax(v) for k, v in batch.head_labels(head).items()}
    args = (to_jax(batch.input_ids), to_jax(batch.attention_mask), to_jax(batch.position_ids))
    one = flax_forward(twins.flax_model, args, labels)
    with jax.set_mesh(mesh):
        report = check_pair(twins.torch_model, sharded, batch, dtype=dtype, sections=sections, title=title,
                            tolerances=tolerances, phases=phases)
        many = flax_forward(sharded, args, labels)
    tol = lambda quantity: tolerance_for(dtype, quantity, tolerances)  # noqa: E731
    names = ("start_logits", "end_logits") if head == "question_answering" else ("logits",)
    note = f"mesh {dict(axes)}: the Flax twin sharded vs itself on one device"
    rows = [Row("head", "logits", compare(f"flax sharded vs unsharded ({n})", getattr(one, n), getattr(many, n),
                                          tol("logits")), note=note) for n in names]
    if one.loss is not None:
        rows.append(Row("head", "loss", compare("flax sharded vs unsharded (loss)", one.loss, many.loss, tol("loss")),
                        note=note))
    # After the head rows, so the table shows one [head] section.
    heads = [i for i, r in enumerate(report.rows) if r.section == "head"]
    at = heads[-1] + 1 if heads else len(report.rows)
    report.rows[at:at] = rows
    report.meta["mesh"] = dict(axes)
    return report
