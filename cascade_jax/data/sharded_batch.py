"""Per-host batches -> global ``jax.Array``s sharded on the batch axis over ('data', 'fsdp')."""

from __future__ import annotations

import math

import jax
import numpy as np

from cascade_jax.sharding import batch_sharding


def global_batch(local_arrays, mesh: jax.sharding.Mesh):
    """A pytree of global arrays from this host's pytree of arrays (batch axis first).

    Every host passes its own rows, as the loader yields them; the global batch is their
    concatenation in process order. Only array leaves are allowed: captions are tokenised first.
    """
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)

    def to_global(path, leaf):
        name = jax.tree_util.keystr(path) or "batch"
        if not isinstance(leaf, (np.ndarray, jax.Array, np.generic)):
            raise TypeError(f"global_batch: leaf {name} is a {type(leaf).__name__}; pass arrays only "
                            f"(tokenise captions, drop the bucket tuple)")
        if leaf.ndim == 0:
            raise ValueError(f"global_batch: leaf {name} is a scalar; every leaf needs a leading batch axis")
        rows = leaf.shape[0] * jax.process_count()
        if rows % shards:
            raise ValueError(f"global_batch: leaf {name} gives a global batch of {rows} rows, which does not "
                             f"divide over the {shards} ('data', 'fsdp') shards of the mesh {dict(mesh.shape)}")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, leaf.ndim), np.asarray(leaf))

    return jax.tree_util.tree_map_with_path(to_global, local_arrays)
