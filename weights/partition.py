"""Partition rules, framework-free: how a table of (name pattern -> mesh axes) cuts one tensor.

Both twins state how a model is cut as a table in the same format (`torch_impl.sharding.
PARTITION_RULES`, `flax_impl.sharding.PARTITION_RULES`): a sequence of rules

    (pattern, axes)

where `pattern` is a regular expression searched in the parameter's HF name and `axes` names,
for each dimension of the tensor *in HF layout* (`[out, in]` for linear weights), the mesh axis
it is split over (`"data"`, `"fsdp"`, `"tensor"`) or None. The first rule whose pattern matches
wins; a name no rule matches is replicated. The same table therefore reads the same in both
twins: the Flax twin reverses the axes of a transposed kernel (`weights.names.is_transposed`).

An axis the mesh does not have (a `(data, tensor)` mesh has no `fsdp`) leaves that dimension
whole, so one table serves every mesh. A dimension split over an axis must divide by the axis'
size: anything else is an error naming the tensor, not a silent replication.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence, Union

__all__ = ["AXES", "AxisSpec", "Rule", "parse_mesh", "partition_spec"]

# The mesh axes the tables speak of: data parallel (rows), fully sharded data parallel
# (parameters split, gathered per layer), tensor parallel (inside a matmul).
AXES = ("data", "fsdp", "tensor")

AxisSpec = Union[str, None]  # one tensor dimension: the mesh axis it is split over, or None
Rule = tuple[str, tuple[AxisSpec, ...]]  # (regex searched in the HF name, axes per HF dimension)


def partition_spec(name: str, shape: Sequence[int], mesh_shape: Mapping[str, int],
                   rules: Sequence[Rule]) -> tuple[AxisSpec, ...]:
    """The mesh axis of each dimension of the tensor `name` (HF layout, one entry per dimension
    of `shape`) under `rules`, on a mesh of `mesh_shape` ({axis name: size}).

    Axes the mesh lacks become None. Raises ValueError, naming the tensor and the rule, when a
    rule's axes do not fit the tensor's rank, name an unknown axis, repeat one, or split a
    dimension the axis size does not divide.
    """
    for pattern, axes in rules:
        if re.search(pattern, name) is None:
            continue
        axes = tuple(axes)
        if len(axes) > len(shape):
            raise ValueError(f"{name}: rule {pattern!r} gives {len(axes)} axes {axes} for a tensor of "
                             f"shape {tuple(shape)}")
        axes = axes + (None,) * (len(shape) - len(axes))  # trailing dimensions: whole
        named = [a for a in axes if a is not None]
        unknown = sorted(set(named) - set(AXES))
        if unknown or len(set(named)) != len(named):
            raise ValueError(f"{name}: rule {pattern!r} axes {axes}: each of {AXES} at most once, "
                             f"got {'unknown ' + str(unknown) if unknown else 'a repeat'}")
        out = tuple(a if a in mesh_shape else None for a in axes)
        for dim, (size, axis) in enumerate(zip(shape, out)):
            if axis is not None and size % mesh_shape[axis]:
                raise ValueError(f"{name}: dimension {dim} (size {size}) cannot be split over mesh axis "
                                 f"{axis!r} of size {mesh_shape[axis]} (rule {pattern!r}); change the "
                                 f"mesh or override the rule")
        return out
    return (None,) * len(shape)


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,tensor=4"` -> `{"data": 2, "tensor": 4}` (the CLI's `--mesh`), in the order given."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, _, size = part.partition("=")
        axis = axis.strip()
        if axis not in AXES or axis in out or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS one of "
                             f"{', '.join(AXES)} (each once) and SIZE >= 1; bad part {part!r}")
        out[axis] = int(size)
    if not out:
        raise ValueError(f"--mesh {text!r}: no axis given (e.g. data=2,tensor=4)")
    return out
