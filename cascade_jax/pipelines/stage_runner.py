"""One stage's whole sampling loop as one compiled program, compiled once per shape.

The network is split into (graphdef, state); graphdef and the sampler settings are static,
the state, conditions and per-image keys are arguments. Noise is drawn inside the program
from one key per image (initial noise and every step's noise), so image i of a batch gets
exactly the pixels it gets when generated alone with the same seed. Compilation happens
ahead of time (``lower().compile()``) so its time is reported apart from sampling time.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cascade_jax.diffusion import SamplerSettings, sample


@dataclasses.dataclass
class StageTiming:
    compile_s: float = 0.0
    sample_s: float = 0.0
    cached: bool = False
    steps: int = 0  # sampler steps the program ran (img2img runs fewer than the settings' steps)


def _noise(keys, x_shape, steps: int):
    """Per-image initial and per-step noise: (B, *x_shape) and (steps, B, *x_shape).

    Drawn with the classic (non-partitionable) threefry lowering: each image has its own key and
    the batch is only ever sharded along the keys, so nothing needs the partitionable variant,
    and XLA:CPU compiles the classic one several times faster (~1 s instead of ~6-8 s per stage).
    """
    def one(key):
        k_init, k_steps = jax.random.split(key)
        return (jax.random.normal(k_init, x_shape, jnp.float32),
                jax.random.normal(k_steps, (steps, *x_shape), jnp.float32))
    with jax.threefry_partitionable(False):
        x_init, noise = jax.vmap(one)(keys)
    return x_init, jnp.swapaxes(noise, 0, 1)


def _run(graphdef, settings: SamplerSettings, x_shape: tuple, state, keys, conditions, uncond, x_init):
    model = nnx.merge(graphdef, state)
    compute_dtype = jax.tree.leaves(state)[0].dtype

    def model_fn(x, r, **cond):
        cond = {k: (v.astype(compute_dtype) if v is not None and jnp.issubdtype(v.dtype, jnp.floating) else v)
                for k, v in cond.items()}
        return model(x.astype(compute_dtype), r, **cond).astype(jnp.float32)

    drawn_init, noise = _noise(keys, x_shape, settings.steps)
    start = drawn_init if x_init is None else x_init.astype(jnp.float32)
    out = sample(model_fn, conditions, uncond, x_init=start, noise=noise, steps=settings.steps, cfg=settings.cfg,
                 cfg_rho=settings.cfg_rho, cfg_t_start=settings.cfg_t_start, cfg_t_stop=settings.cfg_t_stop,
                 cfg_std_per_sample=settings.cfg_std_per_sample, shift=settings.shift, sampler=settings.sampler,
                 eta=settings.eta, t_start=settings.t_start, t_end=settings.t_end, gdf=settings.gdf)
    return out.x0, jnp.all(jnp.isfinite(out.x0))


_run_jit = jax.jit(_run, static_argnums=(0, 1, 2))


def data_mesh() -> Mesh | None:
    """A 1-D mesh over the local devices for data parallelism (None with one device)."""
    devices = jax.local_devices()
    return Mesh(np.asarray(devices), ("data",)) if len(devices) > 1 else None


class StageRunner:
    """Samples one stage with a given network; keeps compiled programs per input shapes."""

    def __init__(self, name: str, model: nnx.Module):
        self.name = name
        self.graphdef, self.state = nnx.split(model)
        self._compiled = {}
        self._mesh = data_mesh()
        if self._mesh is not None:
            self.state = jax.device_put(self.state, NamedSharding(self._mesh, PartitionSpec()))

    def _place(self, tree, batch: int):
        """Device arrays laid out by their shapes alone: the batch axis sharded over the local devices
        when it divides evenly, else replicated. Compiled programs are keyed by the inputs' shardings,
        so an input that arrives laid out differently (a host array, an eager encoder's output, the
        replicated output of the previous stage) must not cost a recompilation."""
        tree = jax.tree.map(jnp.asarray, tree)
        if self._mesh is None:
            return tree
        split = batch % self._mesh.size == 0

        def put(x):
            batched = split and x.ndim and x.shape[0] == batch
            spec = PartitionSpec("data", *([None] * (x.ndim - 1))) if batched else PartitionSpec()
            return jax.device_put(x, NamedSharding(self._mesh, spec))
        return jax.tree.map(put, tree)

    def __call__(self, settings: SamplerSettings, x_shape: tuple, seeds, conditions: dict, uncond: dict | None,
                 x_init=None, timing: StageTiming | None = None):
        """Return the stage output (B, *x_shape) float32 for one seed per image."""
        batch = len(seeds)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        args = self._place((keys, conditions, uncond, x_init), batch)
        leaves, treedef = jax.tree.flatten(args)
        signature = (settings, x_shape, treedef, tuple((a.shape, a.dtype, a.sharding) for a in leaves))
        timing = timing if timing is not None else StageTiming()
        timing.steps = settings.steps
        compiled = self._compiled.get(signature)
        timing.cached = compiled is not None
        if compiled is None:
            start = time.perf_counter()
            compiled = _run_jit.lower(self.graphdef, settings, x_shape, self.state, *args).compile()
            timing.compile_s = time.perf_counter() - start
            self._compiled[signature] = compiled
        start = time.perf_counter()
        x0, finite = compiled(self.state, *args)
        x0 = jax.block_until_ready(x0)
        timing.sample_s = time.perf_counter() - start
        if not bool(finite):
            raise FloatingPointError(
                f"{self.name} produced NaN or inf values. Check the weights (convert/verify.py), and use float32 or "
                f"bfloat16 (float16 overflows in these models).")
        return x0
