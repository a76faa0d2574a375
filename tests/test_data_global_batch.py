"""global_batch: host batches -> jax.Arrays sharded over ('data', 'fsdp') on 8 CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from cascade_jax.data import global_batch
from cascade_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest sets XLA_FLAGS for 8 host devices before jax starts)")
    return make_mesh(data=2, fsdp=2, tensor=2)


def test_global_batch_shards_the_batch_axis(mesh):
    local = {"images": np.arange(8 * 4 * 6 * 3, dtype=np.uint8).reshape(8, 4, 6, 3),
             "tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
    out = global_batch(local, mesh)
    for name, array in out.items():
        assert array.shape == local[name].shape and array.dtype == local[name].dtype
        assert array.sharding.spec == PartitionSpec(("data", "fsdp"), *([None] * (array.ndim - 1)))
        np.testing.assert_array_equal(np.asarray(array), local[name])
        # 4 batch shards (data x fsdp) of 2 rows each; tensor replicates.
        rows = sorted({(s.index[0].start, s.index[0].stop) for s in array.addressable_shards})
        assert rows == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_global_batch_errors_name_the_leaf(mesh):
    with pytest.raises(ValueError, match=r"\['images'\].*6 rows.*4 .*shards"):
        global_batch({"images": np.zeros((6, 2), np.uint8)}, mesh)
    with pytest.raises(TypeError, match=r"\['captions'\]\[0\] is a str"):
        global_batch({"captions": ["a", "b"]}, mesh)
