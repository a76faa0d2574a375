"""Check a converted model against a PyTorch implementation loaded from the same checkpoint.

The PyTorch class is named by import path: the official code (``modules.stage_c:StageC`` in a
checkout of Stability-AI/StableCascade), diffusers (``diffusers:StableCascadeUNet``,
``diffusers.pipelines.wuerstchen:PaellaVQModel``) or transformers (``transformers:CLIPTextModelWithProjection``).
Both run on the same seeded random inputs; the report gives the error of every output.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cascade_jax import storage
from cascade_jax.weights.checkpoint import load_model, read_meta
from cascade_jax.weights.sources import safetensors_files


def import_class(target: str, search_path=None):
    """``"package.module:Class"`` -> the class; ``search_path`` (a checkout) goes first on sys.path."""
    if search_path is not None:
        sys.path.insert(0, str(Path(search_path).resolve()))
    module_name, _, cls_name = target.partition(":")
    if not cls_name:
        raise ValueError(f"{target!r}: expected 'module:Class', e.g. 'diffusers:StableCascadeUNet'")
    return getattr(importlib.import_module(module_name), cls_name)


def family(cls) -> str:
    root = cls.__module__.split(".")[0]
    return root if root in ("diffusers", "transformers") else "official"


def build_torch_model(cls, meta: dict, checkpoint, torch_config=None):
    """Instantiate ``cls`` and load ``checkpoint`` strictly; eval mode, float32."""
    import torch
    from safetensors.torch import load_file

    files = safetensors_files(checkpoint)
    if torch_config is not None:
        config = json.loads(Path(torch_config).read_text())
    elif family(cls) == "official":
        config = meta["config"]
    else:
        folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: a {cls.__name__} needs its config.json (or pass --torch-config)")
        config = json.loads((folder / "config.json").read_text())
    if hasattr(cls, "from_config") and family(cls) == "diffusers":
        model = cls.from_config(config)
    elif family(cls) == "transformers":
        model = cls(cls.config_class.from_dict(config))
    else:
        model = cls(**config)
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    model.load_state_dict(state, strict=True)
    return model.eval().float().requires_grad_(False), torch


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def make_inputs(model_name: str, config: dict, batch: int, size: int | None, seed: int) -> dict:
    """Seeded NCHW inputs of a sensible size for each model."""
    rng = np.random.default_rng(seed)
    if model_name == "stage_c":
        s = size or 12
        inputs = {"x": _rand(rng, batch, config.get("c_in", 16), s, s), "r": rng.uniform(0, 1, batch).astype(np.float32),
                  "clip_text": _rand(rng, batch, 8, config.get("c_clip_text", 1280)),
                  "clip_text_pooled": _rand(rng, batch, 1, config.get("c_clip_text_pooled", 1280)),
                  "clip_img": _rand(rng, batch, 1, config.get("c_clip_img", 768))}
    elif model_name == "stage_b":
        s = size or 32
        inputs = {"x": _rand(rng, batch, config.get("c_in", 4), s, s), "r": rng.uniform(0, 1, batch).astype(np.float32),
                  "effnet": _rand(rng, batch, config.get("c_effnet", 16), max(s // 8, 2), max(s // 8, 2)),
                  "clip": _rand(rng, batch, 1, config.get("c_clip", 1280)),
                  "pixels": _rand(rng, batch, config.get("c_pixels", 3), 8, 8)}
    elif model_name in ("stage_a", "effnet"):
        s = size or 64
        inputs = {"image": rng.uniform(0, 1, (batch, 3, s, s)).astype(np.float32)}
    elif model_name == "previewer":
        s = size or 6
        inputs = {"latent": _rand(rng, batch, config.get("c_in", 16), s, s)}
    elif model_name == "clip_text":
        length = config.get("max_position_embeddings", 77)
        ids = rng.integers(0, config.get("vocab_size", 49408) - 2, (batch, length))
        ids[:, rng.integers(1, length, batch)] = config.get("eos_token_id", 49407)
        inputs = {"input_ids": ids.astype(np.int32), "attention_mask": np.ones((batch, length), np.int32)}
    elif model_name == "clip_vision":
        s = config.get("image_size", 224)
        inputs = {"pixel_values": _rand(rng, batch, config.get("num_channels", 3), s, s)}
    else:
        raise ValueError(f"verify does not know how to drive model {model_name!r}")
    for name in config.get("t_conds", ["sca", "crp"] if model_name == "stage_c" else ["sca"] if model_name == "stage_b" else []):
        inputs[name] = rng.uniform(0, 1, batch).astype(np.float32)
    return inputs


def _nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1) if x.ndim == 4 else x)


def _nchw(x):
    x = np.asarray(x, np.float32)
    return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x


def run_jax(model_name, model, inputs, scale_factor) -> dict:
    j = {k: _nhwc(v) for k, v in inputs.items()}
    if model_name == "stage_a":
        latent = model.encode(j["image"])
        return {"latent": _nchw(latent * scale_factor), "decoded": _nchw(model.decode(latent))}
    if model_name in ("effnet", "previewer"):
        return {"out": _nchw(model(next(iter(j.values()))))}
    if model_name == "clip_text":
        out = model(j["input_ids"], j["attention_mask"])
        return {"hidden_pre_norm": _nchw(out.last_hidden_state_pre_norm), "text_embeds": _nchw(out.text_embeds)}
    if model_name == "clip_vision":
        return {"image_embeds": _nchw(model(j["pixel_values"]).image_embeds)}
    return {"out": _nchw(model(**j))}


def run_torch(model_name, model, torch, inputs) -> dict:
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    fam = family(type(model))
    with torch.no_grad():
        if model_name == "stage_a":
            if fam == "diffusers":
                raw = model.encode(t["image"]).latents
                return {"latent": raw.numpy(), "decoded": model.decode(raw, force_not_quantize=True).sample.numpy()}
            latent = model.encode(t["image"])[0]
            return {"latent": (latent * model.scale_factor).numpy(), "decoded": model.decode(latent).numpy()}
        if model_name in ("effnet", "previewer"):
            return {"out": model(next(iter(t.values()))).numpy()}
        if model_name == "clip_text":
            out = model(input_ids=t["input_ids"].long(), attention_mask=t["attention_mask"], output_hidden_states=True)
            return {"hidden_pre_norm": out.hidden_states[-1].numpy(), "text_embeds": out.text_embeds.numpy()}
        if model_name == "clip_vision":
            return {"image_embeds": model(pixel_values=t["pixel_values"]).image_embeds.numpy()}
        if fam == "diffusers":
            if "clip" in t:  # diffusers names Stage B's pooled text input clip_text_pooled
                t["clip_text_pooled"] = t.pop("clip")
            out = model(sample=t.pop("x"), timestep_ratio=t.pop("r"), return_dict=False, **t)[0]
            return {"out": out.numpy()}
        return {"out": model(**t).numpy()}


def verify(model_dir, torch_target: str, *, torch_path=None, checkpoint=None, torch_config=None,
           batch: int = 1, size: int | None = None, seed: int = 0) -> dict:
    """``{output name: (max abs error, max abs error / max |reference|)}``."""
    meta = read_meta(model_dir)
    cls = import_class(torch_target, torch_path)
    checkpoint = checkpoint or meta["source"]["path"]
    # PyTorch reads local files: a checkpoint (file or folder) or config in a bucket from a cached local copy.
    checkpoint = storage.local_copy(checkpoint) if storage.is_url(checkpoint) else checkpoint
    torch_config = storage.local_copy(torch_config) if torch_config and storage.is_url(torch_config) else torch_config
    torch_model, torch = build_torch_model(cls, meta, checkpoint, torch_config)
    jax_model = load_model(model_dir, dtype="float32")
    scale = getattr(torch_model, "scale_factor", None) or getattr(getattr(torch_model, "config", None), "scale_factor", 1.0)
    if meta["model"] == "stage_a":
        jax_model.scale_factor = float(scale)  # compare like with like when diffusers' 0.3764 is in play
    inputs = make_inputs(meta["model"], meta["config"], batch, size, seed)
    if family(cls) == "diffusers" and batch > 1:
        # diffusers' StableCascadeUNet evaluates `sca or zeros`, which fails for a batch > 1 tensor.
        for name in meta["config"].get("t_conds", []):
            inputs.pop(name, None)
    ours, ref = run_jax(meta["model"], jax_model, inputs, scale), run_torch(meta["model"], torch_model, torch, inputs)
    report = {}
    for name, r in ref.items():
        diff = float(np.max(np.abs(ours[name].astype(np.float64) - r)))
        report[name] = (diff, diff / max(float(np.max(np.abs(r))), 1e-30))
    return report
