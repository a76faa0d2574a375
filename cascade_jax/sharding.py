"""Meshes and logical-axis sharding rules -> ``NamedSharding`` for parameters and batches.

Parameters carry logical axis names (metadata ``axes``, see ``cascade_jax.nn.params``).
Rules map a logical name to a mesh axis; a dimension is sharded only when the mesh axis
divides it, otherwise it is replicated (small layers stay whole, nothing fails).
"""

from __future__ import annotations

import jax
import numpy as np
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


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all); -1 takes what is left."""
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
