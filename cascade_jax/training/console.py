"""What the trainer tells its user on the console: the start-up lines (data, parameters, mesh, output
folders, resume point), each compile of the update with its measured time, and short notes during
the run. Printed once, by process 0, through ``tqdm.write`` so that a progress bar stays intact.
"""

from __future__ import annotations

import contextlib
import time

import jax
from flax import nnx

from cascade_jax import storage


def say(*lines: str):
    if jax.process_index() != 0:
        return
    from tqdm import tqdm

    for line in lines:
        tqdm.write(line)


def millions(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 10_000 else str(count)


def parameter_counts(tree) -> dict[str, int]:
    """Elements of the ``nnx.Param`` arrays of an ``nnx.State`` per top-level module (buffers such as
    BatchNorm statistics are not parameters)."""
    counts = {}
    for name, sub in tree.items():
        leaves = jax.tree.leaves(sub, is_leaf=lambda x: isinstance(x, nnx.Variable))
        total = sum(v.size for v in leaves if isinstance(v, nnx.Param) or not isinstance(v, nnx.Variable))
        if total:
            counts[name] = total
    return counts


def _per_module(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {millions(n)}" for name, n in counts.items())


def parameters_line(params, frozen) -> str:
    trained, kept = parameter_counts(params), parameter_counts(frozen)
    line = f"parameters: {millions(sum(trained.values()))} trainable ({_per_module(trained)})"
    return line + (f", {millions(sum(kept.values()))} frozen ({_per_module(kept)})" if kept else ", none frozen")


def data_line(data) -> str | None:
    """Samples found in the training source and those it skips (known up front, or counted so far)."""
    source = getattr(data, "source", None)
    if source is None:
        return None
    kind = type(source).__name__.removesuffix("Source").lower() or "custom"
    line = f"data: {len(source.records)} images in {source.description} ({kind})"
    uncaptioned = getattr(source, "uncaptioned", ())
    if uncaptioned:
        line += f"; {len(uncaptioned)} without a caption will be skipped (e.g. {uncaptioned[0]})"
    skipped = {k: v for k, v in (getattr(data, "skip_counts", None) or {}).items() if v}
    if skipped:
        line += "; skipped so far: " + ", ".join(f"{k} {v}" for k, v in skipped.items())
    return line


def mesh_line(mesh, batch_size: int) -> str:
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    device = mesh.devices.flat[0]
    kind = device.device_kind if device.platform != "cpu" else "CPU"
    hosts = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"mesh: {axes} over {mesh.devices.size} {kind} device(s){hosts}; global batch {batch_size}"


def folder_lines(cfg, checkpoint_dir, hook_lines=()) -> list[str]:
    """Where the run writes; ``hook_lines``: what further hooks write (an export, LoRA files)."""
    run_dir = storage.join(cfg.output_path, cfg.experiment_id)  # a folder or a bucket URL
    lines = [f"checkpoints: {checkpoint_dir} (every {cfg.save_every} updates, the last {cfg.keep_checkpoints} kept)"]
    if cfg.sample_every:
        lines.append(f"samples: {storage.join(run_dir, 'samples')} (every {cfg.sample_every} updates)")
    lines.append(f"TensorBoard: tensorboard --logdir {storage.join(run_dir, 'logs')}")
    return [*lines, *hook_lines]


def announce_start(run, data, checkpoint_dir, start: int, hook_lines=()):
    cfg = run.cfg
    lines = [data_line(data), parameters_line(run.state.params, run.frozen), mesh_line(run.mesh, cfg.batch_size),
             *folder_lines(cfg, checkpoint_dir, hook_lines)]
    if start >= cfg.updates:
        lines.append(f"resuming from step {start}: all {cfg.updates} updates are done")
    elif start:
        lines.append(f"resuming from step {start} (of {cfg.updates})")
    else:
        lines.append(f"starting at step 0 (of {cfg.updates})")
    say(*(line for line in lines if line))


def batch_shapes(batch: dict) -> str:
    """The image-like arrays of a batch and their shapes (what a new bucket changes)."""
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(batch.items()) if v.ndim >= 3)


@contextlib.contextmanager
def compiling(what: str):
    """Announce the compile of ``what`` and, once done, its time."""
    say(f"compiling {what} (one-time)...")
    start = time.perf_counter()
    yield
    say(f"compiled in {time.perf_counter() - start:.1f} s")
