"""The folder an export goes to: who may replace it (checked before training), and putting a finished
export in a bucket.

An export replaces its whole folder, so it may only replace what it wrote: the folder must be new,
empty, or an earlier export of this run (its ``cascade_export.json`` names the same stage and
checkpoint folder) that holds nothing else. Anything else, e.g. a user's own ``generator.safetensors``
there or another run's export, is refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from cascade_jax import storage
from cascade_jax.weights.checkpoint import META_FILE
from cascade_jax.weights.components import EXPORT_MANIFEST, read_export_manifest


def run_identity(cfg) -> dict:
    """What makes an export "this run's": the stage and the checkpoint folder it resumes from."""
    return {"stage": cfg.stage, "checkpoints": storage.absolute(storage.join(cfg.checkpoint_path, cfg.experiment_id))}


def check_export_folder(out_dir, cfg):
    """``out_dir`` (absolute; a URL stays one), or an error naming what would be overwritten, before training."""
    if storage.is_url(out_dir):
        url = storage.absolute(out_dir)
        storage.check_writable(storage.parent(url), "export folder")
        entries = sorted({rel.split("/")[0] for rel in storage.listing(url)})
        _check_owned(url, entries, cfg)
        return url
    out = Path(out_dir).resolve()
    existing = next(p for p in (out, *out.parents) if os.path.lexists(p))
    if existing == out and (out.is_symlink() or not out.is_dir()):
        raise FileExistsError(f"export folder {out} exists and is not a folder; choose a new --export folder")
    folder = out.parent if existing == out else existing
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the export folder {out}: {folder} is not a writable folder; choose "
                              "another --export folder")
    if existing == out:
        _check_owned(out, sorted(p.name for p in out.iterdir()), cfg)
        if Path.cwd().resolve().is_relative_to(out):
            raise FileExistsError(f"export folder {out} contains the working directory; refusing to replace it")
    return out


def _check_owned(out, entries: list[str], cfg):
    """Nothing in ``entries`` (the folder's top-level names) but this run's earlier export."""
    if not entries:
        return
    manifest = read_export_manifest(out)
    if manifest is None:
        raise FileExistsError(f"export folder {out} already holds {_names(entries)}, which no export of this run "
                              f"wrote; an export replaces its whole folder, so choose a new --export folder (e.g. "
                              f"{storage.join(out, cfg.experiment_id)}) or move them away")
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


def _names(entries) -> str:
    shown = ", ".join(entries[:6])
    return shown + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")


def upload_export(local: Path, url: str):
    """Put the finished export ``local`` at ``url`` (checked by :func:`check_export_folder`). A bucket has no
    rename: each entry replaces the old one (its files uploaded whole, a converted directory's
    ``cascade_model.json`` last, so a half-uploaded one is never read as one), entries the new export lacks
    go, and the record goes last. An interrupted upload is finished by exporting again (the folder is still
    this run's)."""
    old = read_export_manifest(url) or {}
    names = sorted(p.name for p in local.iterdir() if p.name != EXPORT_MANIFEST)
    for name in names:
        storage.remove(storage.join(url, name), recursive=True)
        entry = local / name
        files = sorted((p for p in entry.rglob("*") if p.is_file()), key=lambda p: (p.name == META_FILE, str(p))) \
            if entry.is_dir() else [entry]
        for file in files:
            storage.upload(file, storage.join(url, file.relative_to(local).as_posix()))
    for stale in sorted(set(old.get("entries", ())) - set(names)):
        storage.remove(storage.join(url, stale), recursive=True)
    storage.upload(local / EXPORT_MANIFEST, storage.join(url, EXPORT_MANIFEST))
