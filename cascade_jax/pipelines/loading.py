"""Building a pipeline: from converted directories, official or diffusers weight folders, a
Hugging Face repository, or random weights.

Weights that are not converted yet are converted on first use into a cache folder
(``$CASCADE_JAX_CACHE``, default ``~/.cache/cascade_jax``) keyed by the source file's path,
size and modification time, so later runs load the Orbax checkpoint directly.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import yaml

from cascade_jax.models.clip_tokenizer import CLIPTokenizer, openai_bpe_path, write_tokenizer_folder_from_openai_bpe
from cascade_jax.models.random_init import random_model
from cascade_jax.models.registry import REPO_ROOT, load_config, resolve_config
from cascade_jax.weights.checkpoint import META_FILE, load_model
from cascade_jax.weights.convert import convert_checkpoint

PIPELINE_SETS = REPO_ROOT / "configs" / "pipelines"
REQUIRED = ("stage_c", "stage_b", "stage_a", "text_encoder")

# Where each component lives in a download: official file names (first match wins), then the
# diffusers-format folder. {lite} is "_lite" for the lite variant.
OFFICIAL_FILES = {
    "stage_c": ["stage_c{lite}_bf16.safetensors", "stage_c{lite}.safetensors"],
    "stage_b": ["stage_b{lite}_bf16.safetensors", "stage_b{lite}.safetensors"],
    "stage_a": ["stage_a.safetensors"],
    "effnet": ["effnet_encoder.safetensors"],
    "previewer": ["previewer.safetensors"],
}
DIFFUSERS_FOLDERS = {"stage_c": "prior{lite}", "stage_b": "decoder{lite}", "stage_a": "vqgan",
                     "text_encoder": "text_encoder", "image_encoder": "image_encoder"}


def pipeline_set(name: str) -> dict:
    """Component -> (model name, constructor kwargs) for a set in configs/pipelines/."""
    path = PIPELINE_SETS / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown pipeline set {name!r}; choose one of {sorted(p.stem for p in PIPELINE_SETS.glob('*.yaml'))}")
    components = {}
    for component, spec in yaml.safe_load(path.read_text()).items():
        model, config = load_config(spec) if isinstance(spec, str) else (spec["model"], spec["config"])
        components[component] = (model, config)
    return components


def default_tokenizer_dir() -> Path:
    """A CLIP tokenizer folder built from the BPE file that open_clip_torch ships (for random models)."""
    bpe = openai_bpe_path()
    if bpe is None:
        raise FileNotFoundError("no tokenizer folder given and open_clip_torch (which ships the CLIP BPE merges) "
                                "is not installed: pip install open_clip_torch, or pass tokenizer_dir")
    folder = Path(tempfile.gettempdir()) / "cascade_jax_clip_tokenizer"
    if not (folder / "vocab.json").is_file():
        write_tokenizer_folder_from_openai_bpe(bpe, folder)
    return folder


def random_components(set_name: str = "tiny", seed: int = 0, dtype: str = "float32", tokenizer_dir=None) -> dict:
    """Every component of ``set_name`` with seeded random weights, plus a real CLIP tokenizer."""
    models = {name: random_model(model, config, seed=seed + i, dtype=dtype)
              for i, (name, (model, config)) in enumerate(pipeline_set(set_name).items())}
    models["tokenizer"] = CLIPTokenizer.from_pretrained(tokenizer_dir or default_tokenizer_dir())
    return models


def cache_root() -> Path:
    return Path(os.environ.get("CASCADE_JAX_CACHE", Path.home() / ".cache" / "cascade_jax"))


def _cache_dir(src: Path, component: str, dtype: str) -> Path:
    files = sorted(src.rglob("*.safetensors")) if src.is_dir() else [src]
    stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    digest = hashlib.sha256(f"{stamp}|{dtype}".encode()).hexdigest()[:16]
    return cache_root() / f"{component}-{digest}"


def _find_source(root: Path, component: str, lite: bool):
    """(path, is_converted) for a component in ``root``, or None."""
    tag = "_lite" if lite else ""
    converted = root / component
    if (converted / META_FILE).is_file():
        return converted, True
    for pattern in OFFICIAL_FILES.get(component, []):
        if (root / pattern.format(lite=tag)).is_file():
            return root / pattern.format(lite=tag), False
    folder = DIFFUSERS_FOLDERS.get(component)
    if folder is not None and (root / folder.format(lite=tag)).is_dir():
        return root / folder.format(lite=tag), False
    return None


def load_component(root: Path, component: str, model: str, preset_config: dict, *, lite: bool, dtype: str,
                   required: bool):
    found = _find_source(root, component, lite)
    if found is None:
        if required:
            raise FileNotFoundError(missing_message(root, component, lite))
        return None
    src, converted = found
    if converted:
        return load_model(src, dtype=dtype)
    target = _cache_dir(src, component, dtype)
    if not (target / META_FILE).is_file():
        config = resolve_config(model, None, src) if src.is_dir() else preset_config
        print(f"converting {src} -> {target} (first use only)")
        convert_checkpoint(model, config, src, target, dtype=dtype, overwrite=True)
    return load_model(target, dtype=dtype)


def missing_message(root: Path, component: str, lite: bool) -> str:
    tag = "_lite" if lite else ""
    options = [p.format(lite=tag) for p in OFFICIAL_FILES.get(component, [])]
    folder = DIFFUSERS_FOLDERS.get(component)
    if folder:
        options.append(folder.format(lite=tag) + "/ (diffusers/transformers format with config.json)")
    return (f"{root}: no weights for {component}. Put one of {options} there (download them from the "
            f"stabilityai/stable-cascade repository on Hugging Face), or a converted directory {component}/.")


def resolve_source(source) -> Path:
    """A local folder, or a Hugging Face repository id fetched with huggingface_hub when online."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if str(source).count("/") != 1:
        raise FileNotFoundError(f"{source}: no such folder (and not a Hugging Face repository id 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(source)))
    except Exception as e:  # noqa: BLE001 - any download failure gets the same offline advice
        raise FileNotFoundError(
            f"could not download {source} ({type(e).__name__}: {e}). Offline? Download the repository "
            f"elsewhere (e.g. `huggingface-cli download {source} --local-dir DIR`), copy DIR here and pass its "
            "path instead.") from e


def load_components(source, *, lite: bool = False, dtype: str = "bfloat16") -> dict:
    root = resolve_source(source)
    presets = pipeline_set("lite" if lite else "full")
    models = {}
    for component, (model, config) in presets.items():
        models[component] = load_component(root, component, model, config, lite=lite, dtype=dtype,
                                            required=component in REQUIRED)
    if not (root / "tokenizer").is_dir():
        raise FileNotFoundError(f"{root}: no tokenizer/ folder (the CLIP tokenizer files vocab.json, merges.txt)")
    models["tokenizer"] = CLIPTokenizer.from_pretrained(root / "tokenizer")
    return models
