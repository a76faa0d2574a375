"""Where each pipeline component lives in a Stable Cascade download, locally or on the Hugging Face Hub.

A component is a converted directory (``stage_c/`` holding ``cascade_model.json``), an official single
file (``stage_c_bf16.safetensors``, ``stage_c.safetensors``...), or a diffusers/transformers folder
(``prior/``, ``text_encoder/``...). Official files come in two precisions; the one matching the requested
dtype is preferred, so a bfloat16 pipeline reads (and downloads) the bf16 file and a float32 one the
full-precision file. From the Hub only the files the pipeline will read are fetched: the official
repository holds tens of GB of variants (lite and full, two precisions, ComfyUI checkpoints, LoRAs...).
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub

from cascade_jax import storage
from cascade_jax.named_weights import lookup
from cascade_jax.weights.checkpoint import META_FILE

# Official file names per component; {lite} is "_lite" for the lite variant, {bf16} "_bf16" or "".
OFFICIAL_FILES = {
    "stage_c": "stage_c{lite}{bf16}.safetensors",
    "stage_b": "stage_b{lite}{bf16}.safetensors",
    "stage_a": "stage_a.safetensors",
    "effnet": "effnet_encoder.safetensors",
    "previewer": "previewer.safetensors",
}
DIFFUSERS_FOLDERS = {"stage_c": "prior{lite}", "stage_b": "decoder{lite}", "stage_a": "vqgan",
                     "text_encoder": "text_encoder", "image_encoder": "image_encoder"}
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def official_candidates(component: str, lite: bool, dtype: str) -> list[str]:
    """Official file names for ``component``, the one matching ``dtype`` first."""
    pattern = OFFICIAL_FILES.get(component)
    if pattern is None:
        return []
    tag = "_lite" if lite else ""
    order = ["_bf16", ""] if dtype == "bfloat16" else ["", "_bf16"]
    return list(dict.fromkeys(pattern.format(lite=tag, bf16=b) for b in order))


def diffusers_folder(component: str, lite: bool) -> str | None:
    folder = DIFFUSERS_FOLDERS.get(component)
    return None if folder is None else folder.format(lite="_lite" if lite else "")


def find_source(root: Path, component: str, lite: bool, dtype: str):
    """``(path, is_converted)`` for a component in ``root``, or None."""
    if (root / component / META_FILE).is_file():
        return root / component, True
    for name in official_candidates(component, lite, dtype):
        if (root / name).is_file():
            return root / name, False
    folder = diffusers_folder(component, lite)
    if folder is not None and (root / folder).is_dir():
        return root / folder, False
    return None


def folder_weights(folder: Path) -> Path:
    """The safetensors to convert in a diffusers/transformers folder: the folder itself, or, when the
    download holds precision variants too (``model.safetensors`` and ``model.bf16.safetensors``), the
    file or shard index without a variant tag."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    files = sorted(folder.glob("*.safetensors"))
    if len(indexes) == 1 or (not indexes and len(files) <= 1):
        return folder
    candidates = indexes if indexes else files
    plain = [p for p in candidates if "." not in p.name.split(".safetensors")[0]]
    if len(plain) != 1:
        raise ValueError(f"{folder}: cannot tell which weights to use among {[p.name for p in candidates]}")
    return plain[0]


def missing_message(root: Path, component: str, lite: bool) -> str:
    options = official_candidates(component, lite, "bfloat16")
    folder = diffusers_folder(component, lite)
    if folder:
        options.append(folder + "/ (diffusers/transformers format with config.json)")
    return (f"{root}: no weights for {component}. Put one of {options} there (download them from the "
            f"stabilityai/stable-cascade repository on Hugging Face), or a converted directory {component}/.")


def _folder_files(repo_files: list[str], folder: str, dtype: str) -> list[str]:
    """A diffusers folder's config files and the weights of one precision (bf16 variant for bfloat16
    when there is one, else the plain files)."""
    inside = [f for f in repo_files if f.startswith(folder + "/") and "/" not in f[len(folder) + 1:]]
    weights = [f for f in inside if f.endswith(WEIGHT_SUFFIXES)]
    bf16 = [f for f in weights if ".bf16." in Path(f).name]
    plain = [f for f in weights if "." not in Path(f).name.split(".safetensors")[0]]
    chosen = bf16 if dtype == "bfloat16" and bf16 else (plain or weights)
    return sorted([f for f in inside if f.endswith(".json") and f not in weights] + chosen)


def hub_files(repo_files: list[str], components, *, lite: bool, dtype: str) -> list[str]:
    """The files of a Hub repository (``repo_files``, its listing) that ``components`` need, chosen as
    :func:`find_source` chooses them locally, plus the tokenizer."""
    available = set(repo_files)
    wanted = [f for f in repo_files if f.startswith("tokenizer/")]
    for component in components:
        official = [name for name in official_candidates(component, lite, dtype) if name in available]
        folder = diffusers_folder(component, lite)
        if official:
            wanted.append(official[0])
        elif folder is not None:
            wanted += _folder_files(repo_files, folder, dtype)
    return sorted(set(wanted))


def bucket_snapshot(url: str, components=(), *, lite: bool = False, dtype: str = "bfloat16") -> Path:
    """A local copy of what a pipeline needs from a weights folder in a bucket (one listing, then only those
    files, each fetched again only when it changed): the converted directories of ``components`` where
    there are some, else the files :func:`hub_files` picks, the tokenizer and sampling.json."""
    listing = storage.listing(url)
    if not listing:
        raise FileNotFoundError(f"{url}: no such folder (nothing under that prefix)")
    converted = {c for c in components if f"{c}/{META_FILE}" in listing}
    wanted = set(hub_files(sorted(listing), [c for c in components if c not in converted], lite=lite, dtype=dtype))
    wanted |= {rel for rel in listing if rel.split("/")[0] in converted or rel == "sampling.json"}
    return storage.mirror(url, {rel: listing[rel] for rel in wanted})


def resolve_source(source, components=(), *, lite: bool = False, dtype: str = "bfloat16") -> Path:
    """A local folder, a bucket URL (see :func:`bucket_snapshot`), or a Hugging Face repository id of which
    only what ``components`` need is fetched."""
    named = lookup(source)
    if named is not None:  # a registered set (the embedded demo...); a local folder of that name is "./NAME"
        return named.folder()
    if storage.is_url(source):
        return bucket_snapshot(str(source), components, lite=lite, dtype=dtype)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if str(source).count("/") != 1 or _looks_local(str(source)):
        raise FileNotFoundError(f"{source}: no such folder (and not a Hugging Face repository id 'org/name')")
    try:
        files = hub_files(huggingface_hub.list_repo_files(str(source)), components, lite=lite, dtype=dtype)
        return Path(huggingface_hub.snapshot_download(str(source), allow_patterns=files))
    except Exception as e:  # noqa: BLE001 - any download failure gets the same offline advice
        raise FileNotFoundError(
            f"could not download {source} ({type(e).__name__}: {e}). Offline? Download the repository "
            f"elsewhere (e.g. `huggingface-cli download {source} --local-dir DIR`), copy DIR here and pass its "
            "path instead.") from e


def _looks_local(source: str) -> bool:
    """A missing path that is plainly local (./x, /x, ~/x, or x/y where the folder x exists here): say it
    is missing instead of trying to download it from the Hub."""
    return source.startswith((".", "/", "~")) or Path(source).expanduser().parent.is_dir()


def default_dtype(source) -> str:
    """The dtype a pipeline from ``source`` loads in by default: a named set's own (the embedded demo's tiny
    models were trained and measured in float32), bfloat16 otherwise."""
    named = lookup(source)
    return named.dtype if named is not None else "bfloat16"


def default_size(source) -> tuple[int, int]:
    """The (height, width) a text-to-image call from ``source`` samples by default: a named set's own (the
    demo's 128x128), else the release's 1024x1024."""
    named = lookup(source)
    side = named.image_size if named is not None and named.image_size else 1024
    return side, side
