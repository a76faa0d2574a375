"""LoRA files: the official Stable Cascade format and ComfyUI's, read and written exactly.

Official (what ``train/train_c_lora.py`` saves): ``embeddings.embeddings`` (N, D) token-row deltas,
``embeddings.indices`` (N,) int64, and ``weights.{k}.lora_down`` (rank, in) / ``weights.{k}.lora_up``
(out, rank) for the k-th wrapped weight in ``generator.modules()`` order (see ``models.lora``).
The official file names nothing: the k-th entry is found by re-applying the same filters to the
same model, and new tokens by re-running the same ``train_tokens``. Files written here carry the
same tensors (so the official code loads them) plus a JSON entry ``cascade_jax_lora`` in the
safetensors metadata: the weight key of each entry, rank, alpha, filters, ``train_tokens`` and the
token string of each row, so a file is self-contained.

ComfyUI (``comfy/lora.py`` ``model_lora_keys_unet`` for Stable Cascade Stage C): kohya-style keys
``lora_prior_unet_{module path with '_' for '.'}.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
(scale alpha / rank). ComfyUI splits the packed attention projection into ``to_q``/``to_k``/``to_v``,
so a packed LoRA becomes three that share ``lora_down`` and slice ``lora_up`` (exact both ways).
ComfyUI has no place for token rows; they stay under their official names (ComfyUI skips them
with a "lora key not loaded" warning), so the round trip keeps every tensor.
"""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np

from cascade_jax.models.lora import DEFAULT_FILTERS, LayerFactors, TokenDeltas, all_targets, lora_targets
from cascade_jax.weights.lora_weights import LoRAMismatchError, LoRAWeights, check_lora_fits
from cascade_jax.weights.safetensors_io import SafetensorsReader, save_safetensors

METADATA_KEY = "cascade_jax_lora"
FORMAT_VERSION = 1
COMFY_PREFIX = "lora_prior_unet_"
COMFY_READ_PREFIXES = ("lora_prior_unet_", "lora_unet_")
QKV = ("to_q", "to_k", "to_v")
DEFAULT_TOKEN_WIDTH = 1280  # CLIP-bigG; used only for the empty token table of a LoRA without tokens


def read_tensors(path) -> tuple[dict, dict]:
    """(``{key: numpy array}``, metadata dict) of a safetensors file."""
    reader = SafetensorsReader(path)
    return {k: np.array(reader.get(k)) for k in reader.keys()}, dict(reader.metadata)


def file_info(metadata: dict) -> dict | None:
    """The ``cascade_jax_lora`` metadata entry (None for files from elsewhere)."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"safetensors metadata {METADATA_KEY!r} is not valid JSON ({e})") from e


def detect_format(tensors: dict) -> str:
    if any(k.startswith("weights.") for k in tensors) or set(tensors) <= {"embeddings.embeddings",
                                                                            "embeddings.indices"}:
        return "official"
    return "comfyui"


def _info(lora: LoRAWeights, fmt: str, model_config: dict | None) -> dict:
    ranks = sorted({f.rank for f in lora.layers.values()})
    info = {"version": FORMAT_VERSION, "format": fmt, "modules": list(lora.layers),
            "rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": 1.0,
            "module_filters": None if lora.module_filters is None else list(lora.module_filters),
            "train_tokens": [list(t) for t in lora.train_tokens],
            "tokens": [] if lora.tokens is None else list(lora.tokens.tokens)}
    if model_config is not None:
        info["model_config"] = model_config
    return info


def _token_tensors(lora: LoRAWeights) -> dict:
    if lora.tokens is None:
        return {"embeddings.indices": np.zeros((0,), np.int64),
                "embeddings.embeddings": np.zeros((0, DEFAULT_TOKEN_WIDTH), np.float32)}
    return {"embeddings.indices": np.asarray(lora.tokens.indices, np.int64),
            "embeddings.embeddings": np.asarray(lora.tokens.rows)}


def _official_up(factors: LayerFactors) -> np.ndarray:
    # The official code always scales by 1 / rank (alpha 1): fold any other alpha into lora_up.
    if factors.alpha == 1.0:
        return factors.up
    return (factors.up.astype(np.float32) * np.float32(factors.alpha)).astype(factors.up.dtype)


def save_official(path, lora: LoRAWeights, model_config: dict | None = None):
    """Write ``lora`` in the official format (plus the self-describing metadata); atomic."""
    tensors = _token_tensors(lora)
    for k, factors in enumerate(lora.layers.values()):
        tensors[f"weights.{k}.lora_down"] = factors.down
        tensors[f"weights.{k}.lora_up"] = _official_up(factors)
    info = _info(lora, "official", model_config)
    save_safetensors(path, tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(info)})


def _comfy_module(key: str) -> str:
    return key[:-len(".weight")] if key.endswith(".weight") else key


def save_comfyui(path, lora: LoRAWeights, model, model_config: dict | None = None):
    """Write ``lora`` with ComfyUI's Stable Cascade Stage C keys (q/k/v split); atomic."""
    targets = {t.key: t for t in all_targets(model, "")}
    tensors = {}
    for key, factors in lora.layers.items():
        alpha = np.asarray(factors.alpha, np.float32)
        if key.endswith(".in_proj_weight"):
            module, width = key[:-len(".in_proj_weight")], factors.up.shape[0] // 3
            parts = [(f"{module}.{name}", factors.up[i * width:(i + 1) * width]) for i, name in enumerate(QKV)]
        elif key.endswith(".weight"):
            _check_comfy_shape(key, targets.get(key))
            parts = [(_comfy_module(key), factors.up)]
        else:
            raise ValueError(f"{key}: ComfyUI has no LoRA key for this weight")
        for module, up in parts:
            name = COMFY_PREFIX + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = factors.down
            tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(up)
            tensors[f"{name}.alpha"] = alpha
    if lora.tokens is not None:
        tensors.update(_token_tensors(lora))
    info = _info(lora, "comfyui", model_config)
    info["alpha"] = sorted({f.alpha for f in lora.layers.values()})
    save_safetensors(path, tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(info)})


def _check_comfy_shape(key: str, target):
    shape = () if target is None else tuple(target.base.shape)
    if len(shape) == 4 and shape[:2] != (1, 1):
        raise ValueError(f"{key}: a LoRA on a {shape[0]}x{shape[1]} conv kernel broadcasts over the taps, which "
                         "ComfyUI's 2-D LoRA factors cannot express; only linear and 1x1 conv weights convert")


# ------------------------------------------------------------------------------------ reading
def _tokens(tensors: dict, info: dict | None) -> TokenDeltas | None:
    if "embeddings.indices" not in tensors:
        return None
    indices = np.asarray(tensors["embeddings.indices"]).astype(np.int64).reshape(-1)
    rows = tensors["embeddings.embeddings"]
    strings = list((info or {}).get("tokens") or [None] * len(indices))
    if len(strings) != len(indices):
        raise ValueError(f"metadata names {len(strings)} tokens for {len(indices)} token rows")
    return TokenDeltas(indices, rows, strings) if len(indices) else None


def _train_tokens(info: dict | None) -> list:
    return [tuple(t) for t in (info or {}).get("train_tokens", [])]


def _official_layers(tensors: dict, keys: list[str]) -> tuple[dict, int]:
    count = len([k for k in tensors if re.fullmatch(r"weights\.\d+\.lora_down", k)])
    expected = {f"weights.{k}.{part}" for k in range(count) for part in ("lora_down", "lora_up")}
    extra = sorted(set(tensors) - expected - {"embeddings.embeddings", "embeddings.indices"})
    missing = sorted(expected - set(tensors))
    if extra or missing:
        raise ValueError(f"not an official LoRA file: unexpected tensors {extra[:10]}, missing {missing[:10]}")
    return {key: LayerFactors(tensors[f"weights.{k}.lora_down"], tensors[f"weights.{k}.lora_up"])
            for k, key in zip(range(count), keys)}, count


def read_official(tensors: dict, info: dict | None, model) -> LoRAWeights:
    """Pair ``weights.{k}`` with the model's weights (by the metadata names, else by official order)."""
    filters = tuple(info["module_filters"]) if info and info.get("module_filters") is not None else \
        (None if info else DEFAULT_FILTERS)
    keys = list(info["modules"]) if info else [t.key for t in lora_targets(model, filters)]
    layers, count = _official_layers(tensors, keys)
    lora = LoRAWeights(layers, _tokens(tensors, info), filters, _train_tokens(info))
    if count != len(keys):
        where = "its metadata lists" if info else f"filters {filters} select"
        try:
            check_lora_fits(model, lora)
            detail = ""
        except LoRAMismatchError as e:
            detail = "\n" + str(e)
        raise LoRAMismatchError(f"the file holds {count} LoRA weights but {where} {len(keys)} weights of this "
                                f"model{detail}")
    check_lora_fits(model, lora)
    return lora


def _comfy_names(model) -> dict:
    """ComfyUI LoRA module name -> (official weight key, q/k/v part index or None)."""
    names = {}
    for target in all_targets(model, ""):
        module = target.module_name
        parts = [(f"{module}.{p}", i) for i, p in enumerate(QKV)] if target.attr == "in_proj_weight" else \
            [(module, None)]
        for path, part in parts:
            for prefix in COMFY_READ_PREFIXES:
                names[prefix + path.replace(".", "_")] = (target.key, part)
            names["diffusion_model." + path] = (target.key, part)
    return names


def _comfy_groups(tensors: dict) -> dict:
    groups, unknown = {}, []
    for key, value in tensors.items():
        if key.startswith("embeddings."):
            continue
        match = re.fullmatch(r"(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if match is None:
            unknown.append(key)
            continue
        groups.setdefault(match.group(1), {})[match.group(2).split(".")[0]] = value
    if unknown:
        raise ValueError(f"tensors of a kind cascade_jax does not apply (LoHa/LoKr/DoRA/...): {sorted(unknown)[:10]}")
    return groups


def _factors(name: str, group: dict) -> LayerFactors:
    if "lora_down" not in group or "lora_up" not in group:
        raise ValueError(f"{name}: needs both lora_down.weight and lora_up.weight, found {sorted(group)}")
    down, up = group["lora_down"], group["lora_up"]
    down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)  # 1x1 conv factors are 4-D
    alpha = float(group["alpha"]) if "alpha" in group else float(down.shape[0])  # ComfyUI: no alpha = scale 1
    return LayerFactors(down, up, alpha)


def _pack_qkv(key: str, parts: dict) -> LayerFactors:
    """One packed in_proj LoRA from its q/k/v parts: exact re-packing when they share lora_down
    (files written here), else a block-diagonal LoRA of the summed rank (also exact)."""
    if len(parts) == 3 and all(np.array_equal(parts[0].down, p.down) and parts[0].alpha == p.alpha
                               for p in parts.values()):
        return LayerFactors(parts[0].down, np.concatenate([parts[i].up for i in range(3)]), parts[0].alpha)
    first = parts[min(parts)]
    width, total = first.up.shape[0], sum(p.rank for p in parts.values())
    scale = first.alpha / first.rank
    up = np.zeros((3 * width, total), np.float32)
    downs, offset = [], 0
    for i in sorted(parts):
        part = parts[i]
        up[i * width:(i + 1) * width, offset:offset + part.rank] = part.up * ((part.alpha / part.rank) / scale)
        downs.append(part.down)
        offset += part.rank
    return LayerFactors(np.concatenate(downs).astype(np.float32), up, scale * total)


def read_comfyui(tensors: dict, info: dict | None, model) -> LoRAWeights:
    names = _comfy_names(model)
    groups = _comfy_groups(tensors)
    unknown = sorted(set(groups) - set(names))
    if unknown:
        raise LoRAMismatchError(f"{len(unknown)} LoRA keys name no weight of this Stage C: {unknown[:10]}")
    by_key = {}
    for name, group in groups.items():
        key, part = names[name]
        by_key.setdefault(key, {})[part] = _factors(name, group)
    order = [t.key for t in all_targets(model, "") if t.key in by_key]
    layers = {key: by_key[key][None] if None in by_key[key] else _pack_qkv(key, by_key[key]) for key in order}
    filters = tuple(info["module_filters"]) if info and info.get("module_filters") is not None else None
    lora = LoRAWeights(layers, _tokens(tensors, info), filters, _train_tokens(info))
    check_lora_fits(model, lora)
    return lora


def check_lora_keys(keys, path):
    """Refuse a file that holds no LoRA factors at all (e.g. a full Stage C passed as a LoRA), from its
    tensor names alone, before any tensor is read."""
    keys = sorted(keys)
    if not keys:
        raise ValueError(f"{path} holds no tensors: not a LoRA file")
    if not any("lora" in k or k.startswith("embeddings.") or k.endswith(".alpha") for k in keys):
        raise ValueError(f"{path} is not a LoRA file: none of its {len(keys)} tensors is a LoRA factor (lora_down / "
                         f"lora_up); names such as {keys[:3]} are a full model's weights. A full Stage C is loaded "
                         "as weights (sample/generate.py --weights, convert/convert.py), not with --lora")


def _finite_tensors(tensors: dict, path) -> dict:
    """A non-finite factor would make a NaN model: refuse it by name."""
    bad = [k for k, v in tensors.items() if jnp.issubdtype(v.dtype, jnp.floating) and not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: tensors {bad[:5]} hold NaN or inf values (a diverged training run?); "
                         "this LoRA cannot be applied")
    return tensors


def load_lora(path, model) -> LoRAWeights:
    """Read an official or ComfyUI LoRA file for ``model`` (an abstract model is enough); the
    result is checked to fit, with an error naming every mismatched key and both shapes."""
    reader = SafetensorsReader(path)
    check_lora_keys(reader.keys(), path)
    tensors = _finite_tensors({k: np.array(reader.get(k)) for k in reader.keys()}, path)
    info = file_info(dict(reader.metadata))
    reader = read_official if detect_format(tensors) == "official" else read_comfyui
    try:
        return reader(tensors, info, model)
    except LoRAMismatchError as e:
        raise LoRAMismatchError(f"{path}: {e}") from e


def save_lora(path, lora: LoRAWeights, *, fmt: str = "official", model=None, model_config: dict | None = None):
    if fmt == "official":
        return save_official(path, lora, model_config)
    if fmt == "comfyui":
        if model is None:
            raise ValueError("writing the ComfyUI format needs the model (to check which weights are convs)")
        return save_comfyui(path, lora, model, model_config)
    raise ValueError(f"unknown LoRA format {fmt!r}; use 'official' or 'comfyui'")


def model_config_of(path) -> dict | None:
    """The ``{"model": name, "config": {...}}`` a file written here was made for (None if unknown)."""
    return (file_info(SafetensorsReader(path).metadata) or {}).get("model_config")
