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
experiment_id`` and stage) that holds nothing else; any other existing folder must be empty.
``check_export_folder`` says so before training (``train/*.py`` call it first). The folder is written
aside and renamed into place: the old export or the new one, never a mix.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from cascade_jax.nn.params import named_variables
from cascade_jax.weights import atomic, checkpoint
from cascade_jax.weights.components import (EXPORT_MANIFEST, component_digest, copy_tokenizer, copy_tree,
                                            read_export_manifest)
from cascade_jax.weights.export import export_official

MANIFEST_FORMAT = 1


def generator_arrays(graphdef, params, frozen) -> dict[str, np.ndarray]:
    """The generator's ``{official key: host array}`` with ``params`` (trained or EMA) merged in."""
    modules = nnx.merge(graphdef, jax.device_get(params), jax.device_get(frozen))
    return {k: np.asarray(v[...]) for k, v in named_variables(modules.generator).items()}


def export_generator(out_dir, model_name: str, config: dict, arrays: dict, *, safetensors_dtype=None,
                     overwrite: bool = True, file=None) -> tuple[Path, Path]:
    """Write ``out_dir`` (converted directory) and ``file`` (default ``out_dir.safetensors``: official names and
    layouts, in the stored dtype unless ``safetensors_dtype`` says otherwise)."""
    out_dir = Path(out_dir)
    meta = {"model": model_name, "config": config, "dtype": _dtype_of(arrays),
            "source": {"path": "cascade_jax training"}}
    checkpoint.save(out_dir, meta, arrays, overwrite=overwrite)
    file = out_dir.with_suffix(".safetensors") if file is None else Path(file)
    export_official(out_dir, file, dtype=safetensors_dtype)
    return out_dir, file


def _dtype_of(arrays: dict) -> str:
    floats = [a.dtype for a in arrays.values() if np.issubdtype(a.dtype, np.floating)]
    return str(floats[0]) if floats else "float32"


# ---- the folder: who may replace it -------------------------------------------------------------
def run_identity(cfg) -> dict:
    """What makes an export "this run's": the stage and the checkpoint folder it resumes from."""
    return {"stage": cfg.stage, "checkpoints": str((Path(cfg.checkpoint_path) / cfg.experiment_id).resolve())}


def check_export_folder(out_dir, cfg) -> Path:
    """``out_dir`` resolved, or an error naming what would be overwritten, before any training.

    Allowed: a new folder, an empty one, or an earlier export of this run holding nothing else."""
    out = Path(out_dir).resolve()
    existing = next(p for p in (out, *out.parents) if os.path.lexists(p))
    if existing != out or out.is_symlink() or not out.is_dir():
        if existing == out:
            raise FileExistsError(f"export folder {out} exists and is not a folder; choose a new --export folder")
        _check_writable(existing, out)
        return out
    _check_writable(out.parent, out)
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return out
    manifest = read_export_manifest(out)
    if manifest is None:
        raise FileExistsError(f"export folder {out} already holds {_names(entries)}, which no export of this run "
                              f"wrote; an export replaces its whole folder, so choose a new --export folder (e.g. "
                              f"{out / cfg.experiment_id}) or move them away")
    if manifest.get("run") != run_identity(cfg):
        other = manifest.get("run") or {}
        raise FileExistsError(f"export folder {out} holds the export of another run (stage {other.get('stage')!r}, "
                              f"checkpoints {other.get('checkpoints')}); choose a new --export folder. Each trainer "
                              "exports to its own folder; generate.py --weights C_EXPORT --weights B_EXPORT samples "
                              "two exports together")
    foreign = [e for e in entries if e not in {*manifest.get("entries", ()), EXPORT_MANIFEST}]
    if foreign:
        raise FileExistsError(f"export folder {out} holds {_names(foreign)} beside this run's earlier export; an "
                              "export replaces its whole folder: move them away or choose a new --export folder")
    if Path.cwd().resolve().is_relative_to(out):
        raise FileExistsError(f"export folder {out} contains the working directory; refusing to replace it")
    return out


def _names(entries) -> str:
    shown = ", ".join(entries[:6])
    return shown + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")


def _check_writable(folder: Path, out: Path):
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the export folder {out}: {folder} is not a writable folder; choose "
                              "another --export folder")


# ---- writing ----------------------------------------------------------------------------------------
def export_run(run, out_dir) -> dict:
    """Export ``run`` into ``out_dir`` (see the module docstring). Returns ``{"generator": (dir, file)}`` for
    the last trained weights, and ``"generator_ema"`` too with an EMA."""
    out = check_export_folder(out_dir, run.cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out.parent, out.name)
    tmp = atomic.temp_path(out)
    try:
        with atomic.sigterm_as_exception():
            tmp.mkdir()
            trained, components = _write_trained(run, tmp)
            frozen, skipped = _write_frozen(run, tmp, exclude=set(components))
            _write_manifest(run, tmp, {**components, **frozen}, skipped)
            atomic.publish_dir(tmp, out)
    finally:
        if os.path.lexists(tmp):
            atomic.remove(tmp)
    return {key: (out / folder, out / file) for key, (folder, file) in trained.items()}


def _write_trained(run, folder: Path) -> tuple[dict, dict]:
    """The trained weights: ``name/`` (EMA if kept) and ``name_non_ema/`` (with an EMA), each with its safetensors."""
    name, config = run.task.export_model(None)
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
    sources = getattr(task, "sources", None)
    if sources is not None:
        return sources
    try:  # cached_conditions: nothing was built; the config still says where the frozen models come from
        return task.frozen_sources(cfg, Path(cfg.output_path))
    except (OSError, ValueError) as e:
        warnings.warn(f"the export holds only the trained model: its frozen models cannot be found ({e})")
        return {}


def _write_component(task, cfg, out_dir: Path, name: str, source, built, trained: bool) -> str:
    """Write one frozen model to ``out_dir``; returns where it came from."""
    if trained or source is None:  # trained with the generator, or made in memory (a random ControlNet Stage C)
        origin = "trained with the generator" if trained else "as trained (no file)"
        _save_module(built, _spec(task, cfg, name, source), out_dir, origin)
        return origin
    if isinstance(source, Path):
        copy_tree(source, out_dir)
        return f"copy of {source.resolve()}"
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
    ema = run.state.ema if run.state.ema is not None else run.state.params
    return nnx.merge(run.graphdef, jax.device_get(ema), jax.device_get(run.frozen))


def _spec(task, cfg, name: str, source) -> tuple[str, dict]:
    """(model name, config) of a frozen model: from its source, else the task's (e.g. a random Stage C)."""
    if isinstance(source, Path):
        meta = checkpoint.read_meta(source)
        return meta["model"], meta["config"]
    if source is not None:
        from cascade_jax.pipelines.loading import pipeline_set

        return pipeline_set(source.set_name)[source.component]
    return task.unsourced_spec(cfg, name)


def _save_module(model, spec: tuple[str, dict], out_dir: Path, origin: str):
    arrays = {k: np.asarray(v[...]) for k, v in named_variables(model).items()}
    meta = {"model": spec[0], "config": spec[1], "dtype": _dtype_of(arrays), "source": {"path": origin}}
    checkpoint.save(out_dir, meta, arrays)


def _write_manifest(run, folder: Path, components: dict, skipped: list):
    name, _ = run.task.export_model(None)
    entries = sorted([*components, *(c["file"] for c in components.values() if "file" in c)])
    manifest = {"format": MANIFEST_FORMAT, "run": run_identity(run.cfg), "experiment_id": run.cfg.experiment_id,
                "step": int(jax.device_get(run.state.step)), "trained": name,
                "weights": "ema" if run.state.ema is not None else "final", "entries": entries,
                "components": components, "not_exported": skipped}
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
