"""Building a pipeline: from converted directories, official or diffusers weight folders, a
Hugging Face repository, or random weights.

Weights that are not converted yet are converted on first use into a cache folder
(``$CASCADE_JAX_CACHE``, default ``~/.cache/cascade_jax``) keyed by the source file's path,
size and modification time, the dtype and the model config, so later runs load the Orbax
checkpoint directly.

Official single files carry no config: their architecture comes from a pipeline set
(``configs=``: ``full`` by default, ``lite`` with ``lite=True``, or e.g. ``tiny`` for test
weights). diffusers/transformers folders bring their own ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from cascade_jax.data.clip_tokenizer import CLIPTokenizer, openai_bpe_path, write_tokenizer_folder_from_openai_bpe
from cascade_jax.models.random_init import random_model
from cascade_jax.models.registry import configs_root, load_config, read_config_file
from cascade_jax.weights.checkpoint import META_FILE, load_model
from cascade_jax.weights.convert import ConversionError, convert_checkpoint
from cascade_jax.weights.dtypes import parse_dtype
from cascade_jax.weights.model_configs import resolve_config
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


def pipeline_set(name) -> dict:
    """Component -> (model name, constructor kwargs) for a set in configs/pipelines/ (or a YAML file
    in the same format)."""
    sets = configs_root() / "pipelines"
    path = Path(name) if str(name).endswith((".yaml", ".yml")) else sets / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown pipeline set {name!r}; choose one of {sorted(p.stem for p in sets.glob('*.yaml'))}")
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of component -> preset name or {{model, config}}, "
                         f"got {type(data).__name__}")
    components = {}
    for component, spec in data.items():
        if isinstance(spec, str):
            components[component] = load_config(spec)
        elif isinstance(spec, dict) and isinstance(spec.get("model"), str) and isinstance(spec.get("config"), dict):
            components[component] = (spec["model"], spec["config"])
        else:
            raise ValueError(f"{path}: component {component!r} must be a preset name or a mapping with 'model' "
                             f"(a name) and 'config' (constructor arguments), got {spec!r}")
    return components


def default_tokenizer_dir() -> Path:
    """A CLIP tokenizer folder built from the BPE file that open_clip_torch ships (for random models)."""
    bpe = openai_bpe_path()
    if bpe is None:
        raise FileNotFoundError("no tokenizer folder given and open_clip_torch (which ships the CLIP BPE merges) "
                                "is not installed: pip install open_clip_torch, or pass tokenizer_dir")
    folder = Path(tempfile.gettempdir()) / "cascade_jax_clip_tokenizer"
    if not (folder / "vocab.json").is_file():
        # Write beside it and rename: another process may be reading or writing the same folder.
        tmp = Path(tempfile.mkdtemp(prefix=".cascade_jax_clip_tokenizer-", dir=folder.parent))
        write_tokenizer_folder_from_openai_bpe(bpe, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process got there first (or a stale partial folder is in the way)
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "vocab.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                write_tokenizer_folder_from_openai_bpe(bpe, folder)
    return folder


def random_components(set_name: str = "tiny", seed: int = 0, dtype: str = "float32", tokenizer_dir=None) -> dict:
    """Every component of ``set_name`` with seeded random weights, plus a real CLIP tokenizer."""
    parse_dtype(dtype)  # refuse float16 (and unknown dtypes) with a clear message before building anything
    models = {name: random_model(model, config, seed=seed + i, dtype=dtype)
              for i, (name, (model, config)) in enumerate(pipeline_set(set_name).items())}
    models["tokenizer"] = CLIPTokenizer.from_pretrained(tokenizer_dir or default_tokenizer_dir())
    return models


def cache_root() -> Path:
    return Path(os.environ.get("CASCADE_JAX_CACHE", Path.home() / ".cache" / "cascade_jax"))


def _cache_dir(src: Path, component: str, dtype: str, config: dict) -> Path:
    files = sorted(src.rglob("*.safetensors")) if src.is_dir() else [src]
    stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    digest = hashlib.sha256(f"{stamp}|{dtype}|{json.dumps(config, sort_keys=True)}".encode()).hexdigest()[:16]
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


def _folder_weights(folder: Path) -> Path:
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


def load_component(root: Path, component: str, model: str, preset_config: dict, *, lite: bool, dtype: str,
                   required: bool, config_source: str = "full"):
    found = _find_source(root, component, lite)
    if found is None:
        if required:
            raise FileNotFoundError(missing_message(root, component, lite))
        return None
    src, converted = found
    if converted:
        return load_model(src, dtype=dtype)
    config = resolve_config(model, None, src) if src.is_dir() else preset_config  # config.json
    target = _cache_dir(src, component, dtype, config)
    if not (target / META_FILE).is_file():
        print(f"converting {src} -> {target} (first use only)")
        weights = _folder_weights(src) if src.is_dir() else src
        try:
            convert_checkpoint(model, config, weights, target, dtype=dtype, overwrite=True)
        except ConversionError as e:
            if src.is_dir():
                raise
            raise ConversionError(f"{e}\n{src.name} is converted with the {config_source!r} {component} config; "
                                  f"if these weights have another architecture pass configs=... (a set in "
                                  f"configs/pipelines/, e.g. configs='tiny', or a YAML file)") from e
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


def load_components(source, *, lite: bool = False, dtype: str = "bfloat16", configs=None) -> dict:
    """Every component found in ``source``. ``configs``: the pipeline set (name or YAML file) that gives
    the architecture of official single files; default ``lite`` with ``lite=True``, else ``full``."""
    parse_dtype(dtype)  # refuse float16 before touching any file
    config_source = configs or ("lite" if lite else "full")
    root = resolve_source(source)
    if not (root / "tokenizer").is_dir():
        raise FileNotFoundError(f"{root}: no tokenizer/ folder (the CLIP tokenizer files vocab.json, merges.txt, "
                                "tokenizer_config.json; download tokenizer/ from the stabilityai/stable-cascade "
                                "repository on Hugging Face)")
    presets = pipeline_set(config_source)
    missing = [c for c in REQUIRED if _find_source(root, c, lite) is None]
    if missing:  # say everything that is missing before spending minutes converting the rest
        raise FileNotFoundError("\n".join(missing_message(root, c, lite) for c in missing))
    models = {}
    for component, (model, config) in presets.items():
        models[component] = load_component(root, component, model, config, lite=lite, dtype=dtype,
                                            required=component in REQUIRED, config_source=str(config_source))
    models["tokenizer"] = CLIPTokenizer.from_pretrained(root / "tokenizer")
    return models
