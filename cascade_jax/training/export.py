"""Trained weights out: an export folder is a complete weights folder for what a run trained.

It holds, in the layout ``StableCascadePipeline.from_pretrained`` and ``generate.py --weights`` read:

* the trained model as a converted directory named for what it is (``stage_c/``, ``stage_b/``,
  ``stage_a/``, ``previewer/``, ``controlnet/``) and as official-format safetensors beside it
  (``stage_c.safetensors``, or ``stage_c_bf16.safetensors`` when the master weights are bfloat16).
  With an EMA, ``stage_c/`` holds the EMA weights (what sampling uses, as diffusers' and the official
  trainers' users sample) and ``stage_c_non_ema/`` the last trained weights;
* every frozen model the run trained with (``text_encoder/``, ``image_encoder/``, ``effnet/``,
  ``previewer/``, ``stage_a/``; a ControlNet's ``stage_c/``): a copy of the converted directory it was
  loaded from (hard links where the filesystem allows), or, for weights that exist in no file (the
  random ``encoders`` set), written in float32 as generated; and the ``tokenizer/`` it tokenised with;
* ``cascade_export.json``: the run that wrote it (stage, checkpoint folder), the update, and per
  component where it came from and its digest (``cascade_jax.weights.components``); frozen models that
  are no pipeline component (an LCM teacher) are named there as not exported.

A Stage C export and a Stage B export trained with the same encoders hold identical copies of them,
so ``from_pretrained([C_EXPORT, B_EXPORT])`` samples the pair.

Dtypes: a converted directory keeps the dtype it was stored in (the trained weights: ``param_dtype``,
float32 by default; a frozen copy: its source's); the safetensors hold the trained weights in that same
dtype, exactly what ``convert/convert.py --export`` writes from the folder (``--dtype bfloat16`` there
gives the half-size file).

Overwriting: an export replaces only an earlier export of the same run (same ``checkpoint_path /
experiment_id`` and stage) that holds nothing else; any other existing folder must be empty
(``export_folder.check_export_folder``, which ``train/*.py`` call before training). A local folder is
written aside and renamed into place: the old export or the new one, never a mix. A bucket URL gets a
folder built locally and uploaded entry by entry, its record last (``export_folder.upload_export``).
"""

from __future__ import annotations

import functools
import json
import tempfile
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from cascade_jax import storage
from cascade_jax.models.clip import CLIPEncoder
from cascade_jax.models.unet import CascadeUNet
from cascade_jax.models.unet_stack import unstack_units
from cascade_jax.nn.params import named_variables
from cascade_jax.training.hooks import Hook, StepInfo
from cascade_jax.training.task import RandomSource, work_dir
from cascade_jax.storage import atomic
from cascade_jax.weights import checkpoint
from cascade_jax.training.export_folder import check_export_folder, run_identity, upload_export
from cascade_jax.weights.components import EXPORT_MANIFEST, component_digest, copy_tokenizer, copy_tree
from cascade_jax.weights.export import export_official

MANIFEST_FORMAT = 1


def generator_arrays(graphdef, params, frozen) -> dict[str, np.ndarray]:
    """The generator's ``{official key: host array}`` with ``params`` (trained or EMA) merged in."""
    modules = nnx.merge(graphdef, jax.device_get(params), jax.device_get(frozen))
    if isinstance(modules.generator, CascadeUNet):  # scan_blocks trained it stacked; official keys are per block
        unstack_units(modules.generator)
    return {k: np.asarray(v[...]) for k, v in named_variables(modules.generator).items()}


def export_generator(out_dir, model_name: str, config: dict, arrays: dict, *, safetensors_dtype=None,
                     overwrite: bool = True, file=None) -> tuple[Path, Path]:
    """Write ``out_dir`` (converted directory, a local path or a bucket URL) and ``file`` (default
    ``out_dir.safetensors``: official names and layouts, in the stored dtype unless ``safetensors_dtype`` says
    otherwise)."""
    out_dir = out_dir if storage.is_url(out_dir) else Path(out_dir)
    meta = {"model": model_name, "config": config, "dtype": _dtype_of(arrays),
            "source": {"path": "cascade_jax training"}}
    checkpoint.save(out_dir, meta, arrays, overwrite=overwrite)
    if file is None:
        file = storage.with_suffix(out_dir, ".safetensors") if storage.is_url(out_dir) else \
            out_dir.with_suffix(".safetensors")
    export_official(out_dir, file, dtype=safetensors_dtype)
    return out_dir, file


def _dtype_of(arrays: dict) -> str:
    floats = [a.dtype for a in arrays.values() if np.issubdtype(a.dtype, np.floating)]
    return str(floats[0]) if floats else "float32"


class ExportHook(Hook):
    """Exports the run to ``out_dir`` when it completes (process 0); ``written`` is what :func:`export_run`
    returned. ``train/*.py`` add it (``--export``); ``summary()`` is the JSON they print."""

    def __init__(self, out_dir):
        super().__init__(at_end=True)
        self.out_dir, self.written, self.samples = out_dir, None, None
        self.start_line = f"export: {out_dir} (at the end)"

    def run(self, info: StepInfo):
        self.last_step = info.step
        if info.run.cfg.sample_every:  # the collages of training/samples.py
            self.samples = storage.join(info.run.cfg.output_path, info.run.cfg.experiment_id, "samples")
        if jax.process_index() == 0:
            self.written = export_run(info.run, self.out_dir)

    def summary(self) -> str | None:
        if self.written is None:
            return None
        report = {"export": storage.absolute(self.out_dir), **{k: [str(p) for p in v] for k, v in self.written.items()}}
        if self.samples is not None:
            report["samples"] = [str(self.samples)]
        return json.dumps(report, indent=1)


# ---- writing ----------------------------------------------------------------------------------------
def export_run(run, out_dir) -> dict:
    """Export ``run`` into ``out_dir`` (a local folder or a bucket URL; see the module docstring). Returns
    ``{"generator": (dir, file)}`` for the last trained weights, and ``"generator_ema"`` too with an EMA."""
    out = check_export_folder(out_dir, run.cfg)
    if storage.is_url(out):  # built in a local folder, then uploaded (a bucket has no rename)
        staging = Path(tempfile.mkdtemp(prefix="export-", dir=_staging_root()))
        try:
            trained = _write_folder(run, staging)
            upload_export(staging, out)
        finally:
            atomic.remove(staging)
        return {key: (storage.join(out, folder), storage.join(out, file)) for key, (folder, file) in trained.items()}
    with atomic.replacing(out) as tmp:
        tmp.mkdir()
        trained = _write_folder(run, tmp)
    return {key: (out / folder, out / file) for key, (folder, file) in trained.items()}


def _staging_root() -> Path:
    root = storage.cache_root() / "exports"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _write_folder(run, folder: Path) -> dict:
    """Everything an export holds, into the new local ``folder``; returns the trained entries."""
    trained, components = _write_trained(run, folder)
    frozen, skipped = _write_frozen(run, folder, exclude=set(components))
    _write_manifest(run, folder, {**components, **frozen}, skipped)
    return trained


def _write_trained(run, folder: Path) -> tuple[dict, dict]:
    """The trained weights: ``name/`` (EMA if kept) and ``name_non_ema/`` (with an EMA), each with its safetensors."""
    name, config = run.task.export_model(run.cfg)
    variants = [("generator", name, run.state.params, "trained")]
    if run.state.ema is not None:
        variants = [("generator_ema", name, run.state.ema, "trained (EMA)"),
                    ("generator", f"{name}_non_ema", run.state.params, "trained (last update, no EMA)")]
    trained, components = {}, {}
    for key, entry, params, origin in variants:
        arrays = generator_arrays(run.graphdef, params, run.frozen)
        suffix = "_bf16" if _dtype_of(arrays) == "bfloat16" else ""
        directory, file = export_generator(folder / entry, name, config, arrays,
                                           file=folder / f"{entry}{suffix}.safetensors")
        trained[key] = (entry, file.name)
        components[entry] = {"source": origin, "digest": component_digest(directory), "file": file.name}
    return trained, components


def _write_frozen(run, folder: Path, exclude: set) -> tuple[dict, list]:
    """Every frozen model of the run that is a pipeline component (and its tokenizer): copied from its source,
    or written from memory. Also returns the frozen models that are not pipeline components (an LCM teacher)."""
    from cascade_jax.pipelines.loading import pipeline_set

    task, cfg = run.task, run.cfg
    sources = _frozen_sources(task, cfg)
    trained_attrs = {path[0] for path, _ in nnx.to_flat_state(run.state.params)}
    held = {path[0] for state in (run.state.params, run.frozen) for path, _ in nnx.to_flat_state(state)}
    names = [n for n in dict.fromkeys((*sorted(held), *sources)) if n != "generator" and n not in exclude]
    # What a weights folder holds (the release's components): a frozen model of another kind (the teacher of an
    # LCM distillation) is named in the record but not exported.
    kinds = set(pipeline_set("full"))
    memory = functools.lru_cache(maxsize=1)(lambda: _merged(run))  # the run's models, merged once if needed
    components = {}
    for name in (n for n in names if n in kinds):
        built = getattr(memory(), name) if name in held else None
        origin = _write_component(task, cfg, folder / name, name, sources.get(name), built, name in trained_attrs)
        components[name] = {"source": origin, "digest": component_digest(folder / name)}
    if "text_encoder" in components:
        tokenizer = task.tokenizer_dir(cfg)
        copy_tokenizer(tokenizer, folder / "tokenizer")
        components["tokenizer"] = {"source": f"copy of {tokenizer.resolve()}",
                                   "digest": component_digest(folder / "tokenizer")}
    return components, [n for n in names if n not in kinds]


def _frozen_sources(task, cfg) -> dict:
    """Where the frozen models came from (converted on first use by ``build``: found again here). With
    cached_conditions nothing was built; the config still says where the frozen models come from."""
    try:
        return task.frozen_sources(cfg, work_dir(cfg))
    except (OSError, ValueError) as e:
        warnings.warn(f"the export holds only the trained model: its frozen models cannot be found ({e})")
        return {}


def _write_component(task, cfg, out_dir: Path, name: str, source, built, trained: bool) -> str:
    """Write one frozen model to ``out_dir``; returns where it came from."""
    if trained or source is None:  # trained with the generator, or made in memory (a random ControlNet Stage C)
        origin = "trained with the generator" if trained else "as trained (no file)"
        _save_module(built, _spec(task, cfg, name, source), out_dir, origin)
        return origin
    if not isinstance(source, RandomSource):  # a converted directory, local or in a bucket
        copy_tree(storage.local_copy(source), out_dir)
        return f"copy of {storage.absolute(source)}"
    # A RandomSource: written as generated (float32), the same copy in every task's export; the built model
    # holds exactly that when the run computes in float32.
    model = built if built is not None and _all_float32(built) else source.model("float32")
    _save_module(model, _spec(task, cfg, name, source), out_dir, str(source))
    return str(source)


def _all_float32(module) -> bool:
    """Whether every floating parameter is float32 (a random frozen model built so holds what it was generated as)."""
    return all(v.dtype == np.float32 for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
               if np.issubdtype(v.dtype, np.floating))


def _merged(run):
    """The run's models with the EMA (else trained) weights, unstacked (scan_blocks) to their official keys."""
    ema = run.state.ema if run.state.ema is not None else run.state.params
    modules = nnx.merge(run.graphdef, jax.device_get(ema), jax.device_get(run.frozen))
    for node in [node for _, node in nnx.iter_graph(modules)]:
        if isinstance(node, CascadeUNet):
            unstack_units(node)
        elif isinstance(node, CLIPEncoder):
            node.unstack_layers()
    return modules


def _spec(task, cfg, name: str, source) -> tuple[str, dict]:
    """(model name, config) of a frozen model: from its source, else the task's (e.g. a random Stage C)."""
    if isinstance(source, RandomSource):
        from cascade_jax.pipelines.loading import pipeline_set

        return pipeline_set(source.set_name)[source.component]
    if source is not None:
        meta = checkpoint.read_meta(source)
        return meta["model"], meta["config"]
    return task.unsourced_spec(cfg, name)


def _save_module(model, spec: tuple[str, dict], out_dir: Path, origin: str):
    arrays = {k: np.asarray(v[...]) for k, v in named_variables(model).items()}
    meta = {"model": spec[0], "config": spec[1], "dtype": _dtype_of(arrays), "source": {"path": origin}}
    checkpoint.save(out_dir, meta, arrays)


def _write_manifest(run, folder: Path, components: dict, skipped: list):
    name, _ = run.task.export_model(run.cfg)
    entries = sorted([*components, *(c["file"] for c in components.values() if "file" in c)])
    manifest = {"format": MANIFEST_FORMAT, "run": run_identity(run.cfg), "experiment_id": run.cfg.experiment_id,
                "step": int(jax.device_get(run.state.step)), "trained": name,
                "weights": "ema" if run.state.ema is not None else "final", "entries": entries,
                "components": components, "not_exported": skipped}
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
