"""Shared pieces of the training tests: a toy task on the real trainer (compiles in a second), and
deterministic in-memory data iterators with a checkpointable position.

Run as a script it trains the toy task (the kill -9 / resume test starts it as a subprocess):
``python training_testing.py CKPT_DIR UPDATES LOG_FILE`` appends one line per update to LOG_FILE;
``python training_testing.py interruptible WORK LOG_FILE`` is a long run, as the trainer scripts run it,
for the Ctrl-C test to stop.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.diffusion import adaptive_loss_weight
from cascade_jax.nn.params import param
from cascade_jax.training import config_from_dict, register_task
from cascade_jax.training.task import LossAux, Task, TrainModules

D_IN, D_HIDDEN, D_OUT = 16, 32, 8


class ToyNet(nnx.Module):
    def __init__(self, *, rngs):
        self.w1 = param(rngs, (D_IN, D_HIDDEN), torch_layout="linear", axes=("in", "out"))
        self.b1 = param(rngs, (D_HIDDEN,), torch_layout="same", axes=("out",))
        self.w2 = param(rngs, (D_HIDDEN, D_OUT), torch_layout="linear", axes=("in", "out"))

    def __call__(self, x):
        return jnp.tanh(x @ self.w1[...] + self.b1[...]) @ self.w2[...]


class ToyFrozen(nnx.Module):
    def __init__(self, *, rngs):
        self.proj = param(rngs, (D_IN, D_IN), torch_layout="linear", axes=("in", "out"))

    def __call__(self, x):
        return x @ self.proj[...]


def toy_loss(modules, batch, loss_state):
    """Per-sample MSE of the generator on frozen-projected inputs; adaptive weights from batch logSNRs."""
    pred = modules.generator(modules.frozen(batch["x"]))
    per_sample = jnp.mean(jnp.square(pred - batch["y"]), axis=1)
    weight = 1.0 if loss_state is None else adaptive_loss_weight(loss_state, batch["logsnr"])
    return jnp.mean(per_sample * weight), LossAux(per_sample, batch["logsnr"])


class ToyTask(Task):
    generator_model = "toy"

    def build(self, cfg):
        rngs = nnx.Rngs(cfg.seed)
        return TrainModules(generator=ToyNet(rngs=rngs), frozen=ToyFrozen(rngs=rngs))

    def host_batch(self, cfg, batch, rng):
        return {k: batch[k] for k in ("x", "y", "logsnr")}

    def loss(self, modules, batch, key, loss_state, cfg):
        return toy_loss(modules, batch, loss_state)


register_task("toy", ToyTask)


class ToyData:
    """Row ``i`` of the stream is a fixed function of i, so positions are easy to check."""

    def __init__(self, batch: int, seed: int = 0, stride: int | None = None, offset: int = 0):
        # A host of a multi-process run reads rows [position + offset, +batch) of each global batch of `stride`.
        self.batch, self.seed, self.position = batch, seed, 0
        self.stride, self.offset = stride or batch, offset
        self.teacher = np.random.default_rng(99).standard_normal((D_IN, D_OUT)).astype(np.float32)

    def __iter__(self):
        return self

    def rows(self, start: int, count: int) -> dict:
        xs = np.stack([np.random.default_rng([self.seed, i]).standard_normal(D_IN).astype(np.float32)
                       for i in range(start, start + count)])
        logsnr = np.linspace(-9, 9, count).astype(np.float32) + (start % 7)
        return {"x": xs, "y": np.tanh(xs @ self.teacher), "logsnr": logsnr, "index": np.arange(start, start + count)}

    def __next__(self) -> dict:
        out = self.rows(self.position + self.offset, self.batch)
        self.position += self.stride
        return out

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict):
        self.position = state["position"]


class ImageData:
    """Colour-patch images with captions naming the colour (what the tiny Stage B/C learn)."""

    COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}

    def __init__(self, batch: int, size: int, seed: int = 0):
        self.batch, self.size, self.seed, self.position = batch, size, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        images, captions = [], []
        for i in range(self.position, self.position + self.batch):
            rng = np.random.default_rng([self.seed, i])
            name = list(self.COLOURS)[rng.integers(len(self.COLOURS))]
            image = np.full((self.size, self.size, 3), 128, np.uint8)
            half = self.size // 2
            top, left = rng.integers(0, half, 2)
            image[top:top + half, left:left + half] = self.COLOURS[name]
            images.append(image)
            captions.append(f"a {name} square")
        self.position += self.batch
        return {"images": np.stack(images), "captions": captions, "bucket": (self.size, self.size)}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict):
        self.position = state["position"]


def quick_encoders(folder) -> str:
    """A pipeline-set YAML file: the tiny set with the demo's narrow EfficientNet instead of the full-width one
    (``encoders=FILE``): a tiny Stage C/B trains the same way (measured loss ratios over 30 updates 0.533 / 0.547
    against 0.534 / 0.548) on 14 + 23 s of CPU instead of 22 + 28 s, and its exports are 80 MB smaller."""
    from cascade_jax.pipelines.loading import pipeline_set

    components = {k: {"model": m, "config": c} for k, (m, c) in pipeline_set("tiny").items()}
    components["effnet"] = {"model": "effnet", "config": pipeline_set("demo")["effnet"][1]}
    path = Path(folder) / "quick_encoders.yaml"
    path.write_text(json.dumps(components))  # JSON is YAML
    return str(path)


def toy_config(tmp_path, **overrides):
    values = {"stage": "toy", "experiment_id": "toy", "init": "scratch", "checkpoint_path": str(tmp_path / "ckpt"),
              "output_path": str(tmp_path / "out"), "lr": 0.05, "batch_size": 8, "updates": 4,
              "warmup_updates": 2, "save_every": 1000, "backup_every": 1000, "compute_dtype": "float32",
              "log_every": 1, "seed": 0, "async_checkpointing": False, **overrides}
    return config_from_dict(values)


def host_params(state) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def interruptible_config(work):
    return toy_config(work, updates=10_000, save_every=4, async_checkpointing=True)


def interruptible_main(work: str, log_file: str) -> int:
    """A toy run too long to finish (~20 ms an update) under the trainer scripts' exit handling."""
    from cascade_jax.training import train
    from cascade_jax.training.interrupt import exit_status

    def record(info):
        with open(log_file, "a") as f:
            f.write(json.dumps({"step": info.step, "loss": float(info.metrics["loss"])}) + "\n")
        time.sleep(0.02)

    def work_fn() -> int:
        train(interruptible_config(Path(work)), data=ToyData(8), hooks=[record], progress=False)
        return 0

    return exit_status(work_fn)


def distributed_main(port: int, process_id: int, out_file: str, work: str):
    """One of two processes of a jax.distributed run on the CPU; writes its per-update losses."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from cascade_jax.training import train

    cfg = toy_config(Path(work) / "shared", batch_size=16, updates=4, adaptive_loss_weight=True,
                     grad_accum_steps=2)
    run = train(cfg, data=ToyData(8, stride=16, offset=8 * process_id), progress=False)
    with open(out_file, "w") as f:
        json.dump({"losses": [h["loss"] for h in run.history], "devices": jax.device_count(),
                   "processes": jax.process_count()}, f)
    return interrupted_distributed_run(Path(work), process_id)


def interrupted_distributed_run(work, process_id: int) -> int:
    """A long run that the test stops with Ctrl-C to process 0 only: both processes must stop after the
    same update (JAX's preemption sync point), save it, and exit 130 (process 0) and 143 (process 1)."""
    from cascade_jax.training import train
    from cascade_jax.training.interrupt import exit_status

    def record(info):
        with open(work / f"steps{process_id}", "a") as f:
            f.write(f"{info.step}\n")
        time.sleep(0.02)

    def work_fn() -> int:
        cfg = toy_config(work / "interrupted", batch_size=16, updates=10_000, save_every=1000,
                         async_checkpointing=True)
        train(cfg, data=ToyData(8, stride=16, offset=8 * process_id), hooks=[record], progress=False)
        return 0

    return exit_status(work_fn)


if __name__ == "__main__":
    from cascade_jax.training import train

    if sys.argv[1] == "distributed":
        sys.exit(distributed_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]))
    if sys.argv[1] == "interruptible":
        sys.exit(interruptible_main(sys.argv[2], sys.argv[3]))
    ckpt, updates, log_file = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    cfg = toy_config(ckpt, updates=updates, save_every=2, async_checkpointing=True, keep_checkpoints=2)
    data = ToyData(cfg.batch_size)

    def record(info):
        with open(log_file, "a") as f:
            f.write(json.dumps({"step": info.step, "position": data.position,
                                "loss": float(info.metrics["loss"])}) + "\n")

    train(cfg, data=data, hooks=[record], progress=False)
