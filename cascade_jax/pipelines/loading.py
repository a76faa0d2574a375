"""Building a pipeline: from converted directories, official or diffusers weight folders, a
Hugging Face repository, or random weights.

Weights that are not converted yet are converted on first use into a cache folder
(``$CASCADE_JAX_CACHE``, default ``~/.cache/cascade_jax``; see ``cascade_jax.weights.cache``) keyed by
the source's content, the dtype and the model config, so later runs load the Orbax checkpoint directly.

Official single files carry no config: their architecture comes from a pipeline set
(``configs=``: ``full`` by default, ``lite`` with ``lite=True``, or e.g. ``tiny`` for test
weights). diffusers/transformers folders bring their own ``config.json``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cascade_jax.data.clip_tokenizer import CLIPTokenizer, openai_bpe_path, write_tokenizer_folder_from_openai_bpe
from cascade_jax.models.random_init import random_model
from cascade_jax.models.registry import configs_root, load_config, read_config_file
from cascade_jax.named_weights import lookup
from cascade_jax.pipelines.sources import (DIFFUSERS_FOLDERS, OFFICIAL_FILES, find_source,  # noqa: F401
                                         folder_weights, missing_message, official_candidates, resolve_source)
from cascade_jax.sharding import make_mesh
from cascade_jax.storage import atomic
from cascade_jax.weights.cache import cache_root, cached_model  # noqa: F401  (cache_root: public here before)
from cascade_jax.weights.checkpoint import load_model
from cascade_jax.weights.convert import ConversionError, convert_checkpoint
from cascade_jax.weights.dtypes import parse_dtype
from cascade_jax.weights.model_configs import resolve_config

REQUIRED = ("stage_c", "stage_b", "stage_a", "text_encoder")

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
    # In the user's own cache (not a shared temp folder another user could prepare), named by the
    # BPE file's content; a symlink or a folder this user does not own is not trusted.
    stamp = hashlib.sha256(bpe.read_bytes()).hexdigest()[:16]
    folder = cache_root() / f"clip_tokenizer-{stamp}"
    if _trusted_folder(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(folder.parent, folder.name)
    if os.path.lexists(folder):
        atomic.remove(folder)
    tmp = atomic.temp_path(folder)
    try:
        tmp.mkdir()
        write_tokenizer_folder_from_openai_bpe(bpe, tmp)
        os.rename(tmp, folder)
    except OSError:  # another process published it first
        if not _trusted_folder(folder):
            raise
    finally:
        if os.path.lexists(tmp):
            atomic.remove(tmp)
    return folder


def _trusted_folder(folder: Path) -> bool:
    return (not folder.is_symlink() and folder.is_dir() and folder.stat().st_uid == os.getuid()
            and all((folder / name).is_file() and not (folder / name).is_symlink()
                    for name in ("vocab.json", "merges.txt", "tokenizer_config.json")))


def random_component(set_name, component: str, seed: int = 0, dtype: str = "float32"):
    """One component of the set with seeded random weights: seed + its position in the set, so a component
    is the same in every pipeline and every trainer built from that set (``encoders: tiny``)."""
    components = pipeline_set(set_name)
    if component not in components:
        raise ValueError(f"the pipeline set {set_name!r} has no {component!r}; it has {sorted(components)}")
    model, config = components[component]
    return random_model(model, config, seed=seed + list(components).index(component), dtype=dtype)


def random_components(set_name: str = "tiny", seed: int = 0, dtype: str = "float32", tokenizer_dir=None) -> dict:
    """Every component of ``set_name`` with seeded random weights, plus a real CLIP tokenizer."""
    parse_dtype(dtype)  # refuse float16 (and unknown dtypes) with a clear message before building anything
    models = {name: random_component(set_name, name, seed=seed, dtype=dtype) for name in pipeline_set(set_name)}
    models["tokenizer"] = CLIPTokenizer.from_pretrained(tokenizer_dir or default_tokenizer_dir())
    return models


def load_component(root: Path, component: str, model: str, preset_config: dict, *, lite: bool, dtype: str,
                   required: bool, config_source: str = "full", sharding=None, rules: dict | None = None):
    """One component, restored into ``sharding`` (None, a Sharding, or a Mesh placed by ``rules``; see
    ``load_model``), or None when it is absent and not ``required``."""
    found = find_source(root, component, lite, dtype)
    if found is None:
        if required:
            raise FileNotFoundError(missing_message(root, component, lite))
        return None
    return load_found(found, component, model, preset_config, dtype=dtype, config_source=config_source,
                      sharding=sharding, rules=rules)


def load_found(found, component: str, model: str, preset_config: dict, *, dtype: str, config_source: str = "full",
               sharding=None, rules: dict | None = None):
    """The component at ``found`` (``(path, is_converted)`` from ``find_source``), converted on first use."""
    src, converted = found
    if converted:
        return load_model(src, dtype=dtype, sharding=sharding, rules=rules)
    config = resolve_config(model, None, src) if src.is_dir() else preset_config  # config.json
    weights = folder_weights(src) if src.is_dir() else src

    def convert(entry):
        try:
            convert_checkpoint(model, config, weights, entry, dtype=dtype, overwrite=True)
        except ConversionError as e:
            if src.is_dir():
                raise
            raise ConversionError(f"{e}\n{src.name} is converted with the {config_source!r} {component} config; "
                                  f"if these weights have another architecture pass configs=... (a set in "
                                  f"configs/pipelines/, e.g. configs='tiny', or a YAML file)") from e

    return cached_model(weights, component, dtype, config, convert, sharding=sharding, rules=rules)


def load_components(source, *, lite: bool = False, dtype: str = "bfloat16", configs=None, mesh=None,
                    rules: dict | None = None) -> dict:
    """Every component found in ``source`` (a folder, repository id or "demo", or a list of them, each
    contributing what it holds; see ``weight_folders``), and the pipeline's default sampler settings
    (``prior_defaults`` / ``decoder_defaults``: the official ones changed by the sampling.json of the folder
    holding that stage, if any). ``configs``: the pipeline set (name or YAML file) that gives the
    architecture of official single files; default ``lite`` with ``lite=True``, else ``full``.
    ``mesh`` (a Mesh or a ``make_mesh`` spec such as ``"fsdp=4,tensor=2"``): every component is restored
    straight into its layout on it by ``rules``."""
    from cascade_jax.pipelines import weight_folders as folders

    parse_dtype(dtype)  # refuse float16 before touching any file
    mesh = None if mesh is None else make_mesh(mesh)  # a bad mesh spec fails before any file is read
    config_source = configs or ("lite" if lite else "full")
    presets = pipeline_set(config_source)
    sources = folders.source_list(source)
    roots = folders.resolve_roots(sources, presets, lite=lite, dtype=dtype)
    named = {root: lookup(name) for name, root in zip(sources, roots)}  # registered sets ("demo-lcm"...)
    stage_c_set = named.get(folders.holder(roots, "stage_c", lite, dtype))
    loras = stage_c_set.loras() if stage_c_set is not None else ()  # a missing file fails before minutes of loading
    sampling_dirs = {root: n.sampling() for root, n in named.items() if n is not None and n.sampling}
    sampling = folders.sampling_defaults(roots, lite, dtype, sampling_dirs)  # a bad file fails before loading
    tokenizer = folders.tokenizer_folder(roots)
    # Where every component is (and that no two folders disagree about one) before minutes of converting.
    found = {component: folders.locate(roots, component, lite, dtype) for component in presets}
    missing = [c for c in REQUIRED if found.get(c) is None]
    if missing:
        raise FileNotFoundError(folders.missing_messages(roots, missing, lite))
    models = {}
    for component, (model, config) in presets.items():
        models[component] = None if found[component] is None else load_found(
            found[component], component, model, config, dtype=dtype, config_source=str(config_source),
            sharding=mesh, rules=rules)
    models["tokenizer"] = CLIPTokenizer.from_pretrained(tokenizer)
    if loras:  # merged into the base weights: a pipeline's own --lora / load_loras stack on top of them
        models["stage_c"] = with_loras(models["stage_c"], loras)
    return {**models, "prior_defaults": sampling["prior"], "decoder_defaults": sampling["decoder"]}


def with_loras(stage, loras):
    """``stage`` (Stage C, or Stage B for a b_lcm LoRA) with the LoRA files ``loras`` merged in (a named set's
    built-in LoRAs, e.g. demo-lcm's; the demo evaluation's Stage B LCM-LoRA)."""
    from cascade_jax.models.lora import merged_model, shallow_copy
    from cascade_jax.pipelines.lora import apply_lora_file

    model = shallow_copy(stage)
    for i, path in enumerate(loras):
        apply_lora_file(model, str(path), f"builtin_{i}")
    return merged_model(model)
