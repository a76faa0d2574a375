"""Two real JAX processes (jax.distributed on the CPU): each reads its part, global_batch joins them,
and the global batch equals what one process reads alone."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from data_testing import write_shards

from cascade_jax.data import DataConfig, make_train_loader

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from cascade_jax.data import DataConfig, global_batch, make_train_loader
    from cascade_jax.sharding import make_mesh

    port, index, shards, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)
    cfg = DataConfig(source="webdataset", paths=(shards,), num_workers=2)
    # Also checks the loader fingerprint across the two processes.
    loader = make_train_loader(cfg, global_batch_size=4, image_size=64, seed=3, process_index=jax.process_index(),
                               process_count=jax.process_count())
    mesh = make_mesh(data=-1, fsdp=2)
    it = iter(loader)
    steps = []
    for _ in range(3):
        batch = next(it)
        array = global_batch({"images": batch["images"]}, mesh)["images"]
        assert array.shape == (4, 64, 64, 3), array.shape
        steps.append(np.asarray(multihost_utils.process_allgather(array, tiled=True)))
    it.close()
    np.save(out, np.stack(steps))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_assemble_the_one_process_batch(tmp_path):
    write_shards(tmp_path, 2, 6)
    shards = str(tmp_path / "shard-*.tar")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), shards, str(tmp_path / f"out{i}.npy")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output[-3000:]
    it = iter(make_train_loader(DataConfig(source="webdataset", paths=(shards,), num_workers=2), global_batch_size=4,
                                image_size=64, seed=3))
    expected = np.stack([next(it)["images"] for _ in range(3)])
    it.close()
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"out{i}.npy"), expected)
