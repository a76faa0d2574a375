"""Meshes and logical-axis sharding rules -> ``NamedSharding`` for parameters and batches.

Parameters carry logical axis names (metadata ``axes``, see ``cascade_jax.nn.params``).
Rules map a logical name to a mesh axis; a dimension is sharded only when the mesh axis
divides it, otherwise it is replicated (small layers stay whole, nothing fails).

Training and sampling share this: a mesh from sizes (``make_mesh(data=2, fsdp=4)``), a mapping
(``make_mesh({"fsdp": 4, "tensor": 2})``, a training config's ``mesh``) or a command-line string
(``make_mesh("data=2,fsdp=4")``); the batch split over data and fsdp (``batch_spec``); every
variable placed by its logical axes (``variable_shardings``, ``place_model``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the input dimension of every matrix/conv; tensor parallelism the output one.
DEFAULT_RULES = {
    "in": "fsdp",
    "out": "tensor",
    "qkv": "tensor",
    "vocab": "tensor",
    "embed": "fsdp",
}


def parse_mesh_spec(spec) -> dict[str, int]:
    """Mesh sizes from ``"data=2,fsdp=4"``, a mapping, or an object with data/fsdp/tensor attributes
    (a training ``MeshConfig``). Unnamed axes: data -1 (the devices left over), fsdp 1, tensor 1."""
    if isinstance(spec, str):
        sizes = {}
        for part in (p.strip() for p in spec.split(",")):
            name, _, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if name in sizes:
                raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
            if not value.lstrip("-").isdigit():
                raise ValueError(f"mesh {spec!r}: expected comma-separated AXIS=SIZE with axes {MESH_AXES} "
                                 f"(e.g. 'data=2,fsdp=4'), got {part!r}")
            sizes[name] = int(value)
    elif isinstance(spec, Mapping):
        sizes = dict(spec)
    elif all(hasattr(spec, axis) for axis in MESH_AXES):
        sizes = {axis: getattr(spec, axis) for axis in MESH_AXES}
    else:
        raise TypeError(f"mesh {spec!r} is not understood: pass a Mesh, a mapping of {MESH_AXES} sizes or a string "
                        "like 'data=2,fsdp=4'")
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh {spec!r}: unknown axis {unknown}; the axes are {MESH_AXES}")
    bad = {k: v for k, v in sizes.items() if not isinstance(v, (int, np.integer)) or isinstance(v, bool)
           or (v < 1 and v != -1)}
    if bad:
        raise ValueError(f"mesh {spec!r}: sizes must be positive integers or -1 (the devices left over), got {bad}")
    defaults = {"data": -1, "fsdp": 1, "tensor": 1}
    return {axis: int(sizes.get(axis, default)) for axis, default in defaults.items()}


def make_mesh(data=-1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all); -1 takes what is left.

    ``data`` may also be a whole spec (see ``parse_mesh_spec``) or a ``Mesh`` (returned as it is)."""
    if isinstance(data, Mesh):
        return data
    if not isinstance(data, (int, np.integer)):
        data, fsdp, tensor = parse_mesh_spec(data).values()
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or len(devices) % known:
        raise ValueError(f"mesh sizes data={data} fsdp={fsdp} tensor={tensor} do not fit {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def partition_spec(shape, axes, mesh: Mesh, rules=None) -> PartitionSpec:
    rules = DEFAULT_RULES if rules is None else rules
    spec, used = [], set()
    for dim, name in zip(shape, axes or (None,) * len(shape)):
        mesh_axis = rules.get(name) if name is not None else None
        if mesh_axis is not None and mesh_axis not in mesh.shape:
            raise ValueError(f"sharding rule {name!r} -> {mesh_axis!r}: the mesh has no axis {mesh_axis!r} "
                             f"(its axes: {tuple(mesh.shape)})")
        if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis] or mesh.shape[mesh_axis] == 1:
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def logical_sharding(var, mesh: Mesh, rules=None) -> NamedSharding:
    """The sharding of an ``nnx.Variable`` (or anything with ``shape`` and ``axes`` metadata)."""
    axes = var.get_metadata().get("axes") if hasattr(var, "get_metadata") else None
    return NamedSharding(mesh, partition_spec(tuple(var.shape), axes, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) axis over data and fsdp; the rest is replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def batch_axes(mesh: Mesh, batch: int):
    """The mesh axes a batch of ``batch`` is split over: data and fsdp as in training when they divide it,
    else data alone when it does, else None (replicated). The tensor axis never splits the batch."""
    for axes in (("data", "fsdp"), ("data",)):
        size = int(np.prod([mesh.shape[a] for a in axes]))
        if size > 1 and batch % size == 0:
            return axes
    return None


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_shardings(tree, mesh: Mesh, rules=None):
    """The same tree (a module's ``nnx.State``) with each Variable's value replaced by its ``NamedSharding``."""
    return jax.tree.map(lambda v: v.replace(logical_sharding(v, mesh, rules)), tree, is_leaf=_is_variable)


def put(x, sharding):
    """``x`` laid out as ``sharding``: kept when it already is; an array on one device goes through the host
    (a slice per device). ``jax.device_put`` would compile a resharding program per shape and sharding
    instead: ~3 s of CPU for the tiny Stage C alone, minutes for a full one."""
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        # An equivalent layout is relabelled without moving data; a single-device array is split on the host.
        if not x.sharding.is_equivalent_to(sharding, x.ndim) and len(x.sharding.device_set) == 1 \
                and x.is_fully_addressable and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
            x = np.asarray(x)
    return jax.device_put(x, sharding)


def place_model(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
    """Move ``model``'s variables (in place) to their layout on ``mesh`` by their logical axes and ``rules``;
    an array already laid out so is not copied. Returns the model."""
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(put, state, variable_shardings(state, mesh, rules)))
    return model
