"""Compile targets for planning: TPU slices by the names users rent them under, and simulated CPU devices.

libtpu compiles for any TPU topology without a TPU (``jax.experimental.topologies``), so a step can be
sized for a slice on any machine that has the ``tpu`` extra installed. Names:

* slices as rented: ``v5p-16``, ``v4-8`` (v4 and v5p count TensorCores, two per chip: v5p-16 is 8 chips
  in 2x2x2), ``v5e-16`` / ``v5litepod-16``, ``v6e-8`` (v5e and v6e count chips);
* topologies: ``v5e:2x2``, ``v5p:2x2x2``, ``v4:2x2x1``, ``v6e:4x4``;
* ``cpu-N``: N simulated CPU devices (the same partitioning, but XLA:CPU's temporaries do not size an
  accelerator), the only target that does not need libtpu.

The chip table holds the documented HBM capacity and dense bf16 peak of each generation; the planner's
``fits`` keeps a margin below the capacity since the runtime reserves part of it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re

import jax

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    device_kind: str  # what jax.devices()[0].device_kind says on it
    hbm_gib: float  # HBM per JAX device, as Google Cloud documents it
    peak_flops: float  # dense bf16 FLOP/s per JAX device
    hbm_bandwidth: float  # bytes/s per JAX device
    dims: int  # torus dimensions of a topology (3: v4/v5p, 2: v5e/v6e)
    cores_per_chip_in_name: int  # v4-8 / v5p-16 count TensorCores, v5e-16 / v6e-8 count chips


# Google Cloud TPU documentation (system architecture pages): per chip; v4 and v5p run one JAX device per
# chip (megacore), v5e and v6e have one TensorCore per chip.
CHIPS = {
    "v4": Chip("TPU v4", 32, 275e12, 1200e9, 3, 2),
    "v5p": Chip("TPU v5", 95, 459e12, 2765e9, 3, 2),
    "v5e": Chip("TPU v5 lite", 16, 197e12, 819e9, 2, 1),
    "v6e": Chip("TPU v6 lite", 32, 918e12, 1640e9, 2, 1),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v5": "v5p"}

# Dense bf16 peak FLOP/s per device by device-kind substring, for MFU (GPUs too; unknown: no MFU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}

SLICE_EXAMPLES = "v5p-16, v4-8, v5e-16, v6e-8, v6e-256, v5p-128, a topology like v5e:2x2 or v5p:2x2x2, or cpu-8"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a plan compiles for: its devices (compile-only for TPU) and the chip's capacity and peak."""

    name: str  # as the user gave it
    platform: str  # "tpu" | "cpu"
    topology: str | None  # "v5p:2x2x2"; None for CPU
    devices: tuple
    device_kind: str
    hbm_gib: float | None  # per device; None: unknown (CPU)
    peak_flops: float | None
    hbm_bandwidth: float | None

    @property
    def device_count(self) -> int:
        return len(self.devices)


def peak_flops_for(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), None if unknown."""
    kind = device_kind.lower()
    matches = [(k, v) for k, v in PEAK_FLOPS.items() if k.lower() in kind]
    return max(matches, key=lambda kv: len(kv[0]))[1] if matches else None  # "TPU v5 lite" before "TPU v5"


def topology_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Google Cloud gives ``chips`` chips: 2D 2x2, 2x4, 4x4 ...; 3D 2x2x1, 2x2x2, 2x2x4, 2x4x4 ..."""
    if chips == 1:
        return (1,) * dims
    if chips < 4 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: slice names here cover powers of two from 4 (and 1); give the topology "
                         "itself instead (e.g. v5p:2x2x3)")
    shape = [2, 2] + [1] * (dims - 2)
    while shape[0] * shape[1] * (shape[2] if dims == 3 else 1) < chips:
        smallest = min(range(dims), key=lambda i: (shape[i], -i))  # grow the last of the smallest sides
        shape[smallest] *= 2
    return tuple(shape)


def parse_target(name: str) -> tuple[str, str]:
    """(generation, topology like "2x2x2") of a slice name or topology string; ValueError otherwise."""
    text = name.strip().lower()
    match = re.fullmatch(r"(v\d+[a-z]*)(?::|-)(.+)", text)
    if not match:
        raise ValueError(f"--plan {name!r}: not a TPU slice or topology; use e.g. {SLICE_EXAMPLES}")
    generation, rest = ALIASES.get(match.group(1), match.group(1)), match.group(2)
    if generation not in CHIPS:
        raise ValueError(f"--plan {name!r}: unknown TPU generation {match.group(1)!r}; known: {sorted(CHIPS)}")
    chip = CHIPS[generation]
    if ":" in text:
        sides = rest.split("x")
        if len(sides) != chip.dims or not all(s.isdigit() and int(s) > 0 for s in sides):
            raise ValueError(f"--plan {name!r}: a {generation} topology has {chip.dims} sides, e.g. "
                             f"{generation}:{'x'.join(['2'] * chip.dims)}")
        return generation, "x".join(sides)
    if not rest.isdigit() or int(rest) < 1:
        raise ValueError(f"--plan {name!r}: the number after '-' counts {'TensorCores' if chip.cores_per_chip_in_name > 1 else 'chips'}"
                         f", e.g. {generation}-{8 * chip.cores_per_chip_in_name}")
    count = int(rest)
    if count % chip.cores_per_chip_in_name:
        raise ValueError(f"--plan {name!r}: {generation} names count TensorCores, two per chip; use an even number")
    return generation, "x".join(map(str, topology_shape(count // chip.cores_per_chip_in_name, chip.dims)))


def tpu_target(name: str) -> Target:
    """The compile-only devices of a TPU slice (needs libtpu, no TPU)."""
    generation, topology = parse_target(name)
    chip = CHIPS[generation]
    sides = [int(s) for s in topology.split("x")]
    kwargs = {}
    if generation == "v4":
        kwargs["chip_config_name"] = "megacore"  # one JAX device per chip, as a v4 slice runs
    if all(s == 1 for s in sides):
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    quiet_compile_only_libtpu(f"{generation}-{count_in_name(generation, sides)}")
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:{topology}", **kwargs)
    except (RuntimeError, ValueError, ImportError) as e:  # JaxRuntimeError is a RuntimeError
        raise RuntimeError(f"--plan {name}: could not open TPU topology {generation}:{topology} ({e}); planning for "
                           "TPUs needs libtpu: pip install 'cascade-jax[tpu]' (or jax[tpu] at the installed jax "
                           "version)") from e
    return Target(name, "tpu", f"{generation}:{topology}", tuple(desc.devices), chip.device_kind, chip.hbm_gib,
                  chip.peak_flops, chip.hbm_bandwidth)


def count_in_name(generation: str, sides) -> int:
    chips = 1
    for side in sides:
        chips *= side
    return chips * CHIPS[generation].cores_per_chip_in_name


GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def skip_absent_tpu():
    """libtpu (the ``tpu`` extra, installed for ``--plan``) on a machine without a TPU makes JAX try a TPU backend
    on first use: it fails after printing libtpu's initialisation errors, then JAX falls back to the CPU. When
    libtpu is installed, no TPU device file exists (``/dev/accel*``, ``/dev/vfio/N``), no GPU plugin is
    installed and nothing chose the platforms, JAX is told to use the CPU, which it would have used anyway."""
    if jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS"):
        return
    if importlib.util.find_spec("libtpu") is None or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    if any(importlib.util.find_spec(plugin) for plugin in GPU_PLUGINS):
        return
    try:
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # the backends already started
        pass


def quiet_compile_only_libtpu(accelerator_type: str):
    """Environment for libtpu on a machine without a TPU, set before it loads (values already set win):
    several planning processes may load it at once (its lockfile is for processes that own TPU chips), and
    the slice type and worker list it would otherwise look up, warning, are given."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type.replace("v5e", "v5litepod"))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def cpu_target(name: str, count: int) -> Target:
    """``count`` simulated CPU devices; set before JAX starts its CPU backend (``jax_num_cpu_devices``)."""
    if not jax.config.jax_num_cpu_devices or jax.config.jax_num_cpu_devices < count:
        try:
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError:  # the backend is already up
            pass
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise RuntimeError(f"--plan {name}: JAX's CPU backend already started with {len(devices)} devices; run with "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={count} (or plan for a TPU slice)")
    return Target(name, "cpu", None, tuple(devices[:count]), devices[0].device_kind, None, None, None)


def resolve_target(name: str) -> Target:
    """A :class:`Target` from ``v5p-16``, ``v5e:2x2``, ``cpu-8`` ... (see the module docstring)."""
    match = re.fullmatch(r"cpu-(\d+)", name.strip().lower())
    if match:
        if int(match.group(1)) < 1:
            raise ValueError(f"--plan {name!r}: cpu-N needs N >= 1")
        return cpu_target(name, int(match.group(1)))
    return tpu_target(name)


def plan_target(name: str | None) -> Target | None:
    """The target of ``--plan NAME`` (None or "": this process's devices). For a TPU slice the process's own
    backend is pinned to the CPU first (when nothing chose one): planning compiles for the topology's devices
    and must neither need nor take a local TPU."""
    if not name:
        return None
    if not name.strip().lower().startswith("cpu") and not jax.config.jax_platforms:
        try:
            jax.config.update("jax_platforms", "cpu")
        except RuntimeError:  # backends already started: they stay as they are
            pass
    return resolve_target(name)
