"""One stage's whole sampling loop as one compiled program, compiled once per shape.

The network is split into (graphdef, state); graphdef and the sampler settings are static,
the state, conditions, per-image keys and the per-step guidance scales are arguments (a new
guidance scale reuses the program). Noise is drawn inside the program
from one key per image (initial noise and every step's noise), so image i of a batch gets
exactly the pixels it gets when generated alone with the same seed. Compilation happens
ahead of time (``lower().compile()``) so its time is reported apart from sampling time.

Layout: with a ``mesh`` (and logical-axis ``rules``, the trainer's), every variable of the network is
placed by its logical axes as in training (parameters sharded over fsdp/tensor: model-parallel
sampling of a network that does not fit one chip), and the batch is split over data and fsdp when
they divide it, else over data, else replicated. Without one, the batch is split over the local
devices and the network replicated. The program is compiled with these shardings as its explicit
input and output shardings.

Conditions are a dict of arrays (or pytrees of arrays, e.g. a list of ControlNet residuals)
passed to the network as keyword arguments; the unconditional dict has the same keys.

Progress: with a ``callback``, the compiled loop calls back to the host after every step
(``jax.debug.callback``; unordered, because ordered effects are refused on more than one device,
so the host side puts the events back in step order). Without one, no callback is compiled in:
the program is the same as before callbacks existed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cascade_jax.diffusion import SamplerSettings, sample_with_settings
from cascade_jax.pipelines.programs import MAX_PROGRAMS, ProgramCache, fresh_jit
from cascade_jax.sharding import batch_axes, make_mesh, put, variable_shardings

SEED_LIMIT = 1 << 32  # seeds are uint32: 0 <= seed < 2**32


@dataclasses.dataclass
class StageTiming:
    compile_s: float = 0.0
    sample_s: float = 0.0
    cached: bool = False
    steps: int = 0  # sampler steps the program ran (img2img runs fewer than the settings' steps)


class StepEvent(NamedTuple):
    """What a progress callback receives after each step of a stage."""

    stage: str  # "Stage C" or "Stage B"
    step: int  # steps done so far, 1 .. steps
    steps: int
    x0: np.ndarray | None  # the step's predicted x0 (B, h, w, c) float32, when asked for (``callback_x0``)


def image_keys(seeds, stream: int = 0) -> jax.Array:
    """One PRNG key per seed; ``stream`` > 0 folds a stream number in (independent noise of another
    stage for the same seed, without seed arithmetic that could overflow uint32)."""
    seeds = list(seeds)
    bad = [s for s in seeds if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or not 0 <= s < SEED_LIMIT]
    if bad:
        raise ValueError(f"seeds must be integers in [0, 2**32), got {bad[:3]}")
    return _keys_of_seeds(np.asarray(seeds, np.uint32), stream)


@functools.partial(jax.jit, static_argnums=1)
def _keys_of_seeds(seeds, stream: int):
    # Compiled once per batch size and stream: run eagerly, the two vmaps were traced on every call
    # (~3 ms of host time per stage, a tenth of a few-step sample's wall time on a CPU).
    keys = jax.vmap(jax.random.key)(seeds)
    return keys if stream == 0 else jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


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


# ---- host side of the progress callback -------------------------------------------------------
_LISTENERS: dict[int, "_Listener"] = {}
_LISTENER_IDS = itertools.count(1)


class _Listener:
    """Collects the devices' per-step reports and hands the user's callback one event per step, in order."""

    def __init__(self, name: str, steps: int, batch: int, x_shape: tuple, with_x0: bool, callback):
        self.name, self.steps, self.batch, self.x_shape = name, steps, batch, x_shape
        self.with_x0, self.callback = with_x0, callback
        self.pending: dict[int, dict[int, np.ndarray]] = {}
        self.next, self.error = 0, None
        self.lock = threading.Lock()

    def receive(self, index: int, rows: np.ndarray):
        """``rows``: one row per image this device holds: (batch position, the image's x0 or a probe)."""
        with self.lock:
            images = self.pending.setdefault(index, {})
            images.update((int(row[0]), row[1:]) for row in rows)
            while len(self.pending.get(self.next, ())) == self.batch and self.error is None:
                images = self.pending.pop(self.next)
                x0 = None
                if self.with_x0:
                    x0 = np.stack([images[i] for i in range(self.batch)]).reshape(self.batch, *self.x_shape)
                self.next += 1
                try:
                    self.callback(StepEvent(self.name, self.next, self.steps, x0))
                except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread after the run
                    self.error = e


def _emit(ids, rows):
    # The arguments arrive as jax Arrays: one np.asarray each, as few as possible (int() on a jax Array
    # dispatches through jax, which tripled the cost of the whole callback on a CPU).
    listener_id, index = np.asarray(ids).tolist()
    listener = _LISTENERS.get(listener_id)
    if listener is not None:
        listener.receive(index, np.asarray(rows))


def _step_hook(listener_id, positions, with_x0: bool):
    """A hook that reports each step from every device with only the images it holds (``partitioned``):
    gathering a sharded x0 onto one device for the callback deadlocked XLA:CPU's collectives. The batch
    position travels in the same array as the data, so the rows stay matched whatever the layout."""
    def on_step(index, x, x0):
        flat = x0.reshape(x0.shape[0], -1)
        # Without x0, one element of it still ties the report to the end of the step.
        data = flat if with_x0 else flat[:, :1]
        rows = jnp.concatenate([positions.astype(jnp.float32)[:, None], data], axis=1)
        ids = jnp.stack([listener_id.astype(jnp.int32), index.astype(jnp.int32)])
        jax.debug.callback(_emit, ids, rows, partitioned=True)
    return on_step


# ---- the compiled program ----------------------------------------------------------------------
def program_settings(settings: SamplerSettings) -> SamplerSettings:
    """The settings a compiled program depends on: all but the guidance scale's value, which reaches the
    program as an argument (its per-step scales), so one program serves every guidance scale."""
    return settings if settings.cfg is None else settings.replace(cfg=1.0)


def _run(graphdef, settings: SamplerSettings, x_shape: tuple, progress: str | None, state, keys, conditions,
         uncond, x_init, listener_id, positions, cfg_scale):
    model = nnx.merge(graphdef, state)
    compute_dtype = jax.tree.leaves(state)[0].dtype

    def cast(v):
        return v.astype(compute_dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v

    def model_fn(x, r, **cond):
        return model(x.astype(compute_dtype), r, **jax.tree.map(cast, cond)).astype(jnp.float32)

    drawn_init, noise = _noise(keys, x_shape, settings.steps)
    start = drawn_init if x_init is None else x_init.astype(jnp.float32)
    on_step = None if progress is None else _step_hook(listener_id, positions, progress == "x0")
    out = sample_with_settings(model_fn, settings, conditions, uncond, x_init=start, noise=noise, on_step=on_step,
                               cfg_scale=cfg_scale)
    return out.x0, jnp.all(jnp.isfinite(out.x0))


class StageRunner:
    """Samples one stage with a given network; keeps compiled programs per input shapes.

    ``mesh``: a ``Mesh`` or a spec for ``make_mesh`` (``"fsdp=4,tensor=2"``, ``{"data": 2, "fsdp": 4}``);
    default: the local devices on the data axis. ``rules``: logical axis -> mesh axis (default
    ``cascade_jax.sharding.DEFAULT_RULES``), as a training config's ``sharding_rules``. At most
    ``max_programs`` compiled programs are kept (see ``programs``); the guidance scale is an argument of
    a program, not part of it, so a new scale never compiles.
    """

    def __init__(self, name: str, model: nnx.Module, mesh: Mesh | str | dict | None = None, rules: dict | None = None,
                 max_programs: int = MAX_PROGRAMS):
        self.name, self.rules = name, rules
        self.graphdef, self.state = nnx.split(model)
        self._compiled = ProgramCache(max_programs)
        if mesh is None:
            devices = jax.local_devices()
            mesh = make_mesh(devices=devices) if len(devices) > 1 else None  # all devices on the data axis
        self.mesh = None if mesh is None else make_mesh(mesh)
        self.state_shardings = None
        if self.mesh is not None:
            self.state_shardings = variable_shardings(self.state, self.mesh, rules)
            self.state = jax.tree.map(put, self.state, self.state_shardings)  # kept where already laid out so

    def with_model(self, model: nnx.Module) -> "StageRunner":
        """A runner for another network of this stage (e.g. with LoRAs merged) on the same mesh and rules."""
        return StageRunner(self.name, model, self.mesh, self.rules, self._compiled.max_size)

    def _batch_sharding(self, batch: int, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(batch_axes(self.mesh, batch), *([None] * (ndim - 1))))

    def _place(self, tree, batch: int):
        """Device arrays laid out by their shapes alone: the batch axis split over the mesh's data (and fsdp)
        axes when it divides evenly (``batch_axes``), else replicated. Compiled programs are keyed by the
        inputs' shardings, so an input that arrives laid out differently (a host array, an eager encoder's
        output, the output of the previous stage) must not cost a recompilation."""
        tree = jax.tree.map(jnp.asarray, tree)
        if self.mesh is None:
            return tree

        def place(x):
            batched = x.ndim and x.shape[0] == batch
            sharding = self._batch_sharding(batch, x.ndim) if batched else NamedSharding(self.mesh, PartitionSpec())
            return put(x, sharding)
        return jax.tree.map(place, tree)

    def _jitted(self, args, batch: int, x_shape: tuple):
        """``_run`` (as a new function: see ``programs.fresh_jit``) with explicit shardings: the state as
        placed, the arguments as ``_place`` laid them out, x0 split like the batch and the finiteness flag
        replicated."""
        if self.mesh is None:
            return fresh_jit(_run, static_argnums=(0, 1, 2, 3))
        arg_shardings = jax.tree.map(lambda a: a.sharding, args)
        out = (self._batch_sharding(batch, 1 + len(x_shape)), NamedSharding(self.mesh, PartitionSpec()))
        return fresh_jit(_run, static_argnums=(0, 1, 2, 3), in_shardings=(self.state_shardings, *arg_shardings),
                         out_shardings=out)

    def lower(self, settings: SamplerSettings, x_shape: tuple, progress: str | None, args, batch: int):
        """The program for these settings and placed ``args`` (``_arguments``), lowered (not compiled)."""
        jitted = self._jitted(args, batch, x_shape)
        return jitted.lower(self.graphdef, program_settings(settings), x_shape, progress, self.state, *args)

    def _arguments(self, settings: SamplerSettings, seeds, conditions, uncond, x_init, listener_id: int, stream=0):
        """The program's array arguments, placed: the batched ones by ``_place``, the per-step guidance
        scales (the value of ``settings.cfg``) replicated."""
        batch = len(seeds)
        args = self._place((image_keys(seeds, stream), conditions, uncond, x_init, np.int32(listener_id),
                            np.arange(batch, dtype=np.int32)), batch)
        cfg_scale = jnp.asarray(settings.plan().cfg_scale, jnp.float32)
        if self.mesh is not None:
            cfg_scale = put(cfg_scale, NamedSharding(self.mesh, PartitionSpec()))
        return (*args, cfg_scale)

    def _program(self, settings, x_shape, progress, args, timing: StageTiming, batch: int):
        leaves, treedef = jax.tree.flatten(args)
        signature = (program_settings(settings), x_shape, progress, treedef,
                     tuple((a.shape, a.dtype, a.sharding) for a in leaves))
        compiled = self._compiled.get(signature)
        timing.cached = compiled is not None
        if compiled is None:
            start = time.perf_counter()
            compiled = self.lower(settings, x_shape, progress, args, batch).compile()
            timing.compile_s = time.perf_counter() - start
            self._compiled.put(signature, compiled)
        return compiled

    def __call__(self, settings: SamplerSettings, x_shape: tuple, seeds, conditions: dict, uncond: dict | None,
                 x_init=None, timing: StageTiming | None = None, *, stream: int = 0,
                 callback: Callable[[StepEvent], None] | None = None, callback_x0: bool = False):
        """Return the stage output (B, *x_shape) float32 for one seed per image.

        ``stream`` selects independent noise for the same seeds (``image_keys``). ``callback(StepEvent)``
        runs on the host after every step, in step order; ``callback_x0`` also hands it the step's x0.
        """
        batch = len(seeds)
        if x_init is not None and tuple(np.shape(x_init)) != (batch, *x_shape):
            raise ValueError(f"{self.name}: x_init has shape {tuple(np.shape(x_init))}; expected {(batch, *x_shape)}")
        progress = None if callback is None else ("x0" if callback_x0 else "step")
        listener_id = next(_LISTENER_IDS)
        args = self._arguments(settings, seeds, conditions, uncond, x_init, listener_id, stream)
        timing = timing if timing is not None else StageTiming()
        timing.steps = settings.steps
        compiled = self._program(settings, x_shape, progress, args, timing, batch)
        if callback is not None:
            _LISTENERS[listener_id] = _Listener(self.name, settings.steps, batch, x_shape, callback_x0, callback)
        start = time.perf_counter()
        try:
            x0, finite = compiled(self.state, *args)
            x0 = jax.block_until_ready(x0)
            if callback is not None:
                jax.effects_barrier()  # every step's callback has run
        finally:
            listener = _LISTENERS.pop(listener_id, None)
        timing.sample_s = time.perf_counter() - start
        if listener is not None and listener.error is not None:
            raise listener.error
        if not bool(finite):
            raise FloatingPointError(
                f"{self.name} produced NaN or inf values. Check the weights (convert/verify.py), and use float32 or "
                f"bfloat16 (float16 overflows in these models).")
        return x0
