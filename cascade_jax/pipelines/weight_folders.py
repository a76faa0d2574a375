"""Several weights folders as one pipeline: each folder contributes the components it holds.

``from_pretrained([C_EXPORT, B_EXPORT])`` (``generate.py --weights C_EXPORT --weights B_EXPORT``) takes
Stage C and its encoders from a Stage C trainer's export and Stage B and Stage A from a Stage B
trainer's export. A component held by more than one folder (both exports carry the text encoder,
EfficientNet and tokenizer they trained with) is used only when every copy is the same weights
(``cascade_jax.weights.components.component_digest``); different copies are refused by name, never
mixed silently. The sampler defaults (``sampling.json``) of Stage C come from the folder that holds
Stage C, those of Stage B from the folder that holds Stage B.
"""

from __future__ import annotations

import os
from pathlib import Path

from cascade_jax.pipelines.defaults import read_sampling_defaults
from cascade_jax.pipelines.sources import find_source, missing_message, resolve_source
from cascade_jax.weights.components import component_digest, read_export_manifest

TOKENIZER = "tokenizer"


def source_list(source) -> list:
    """``source`` (one folder / repository id / "demo", or a list of them) as a non-empty list."""
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    bad = [s for s in sources if not isinstance(s, (str, os.PathLike))]
    if not sources or bad:
        raise ValueError(f"weights: pass a folder, a repository id or \"demo\", or a non-empty list of them; "
                         f"got {source!r}")
    return sources


def resolve_roots(source, components, *, lite: bool, dtype: str) -> list[Path]:
    roots = [resolve_source(s, components, lite=lite, dtype=dtype) for s in source_list(source)]
    repeated = {str(r) for r in roots if roots.count(r) > 1}
    if repeated:
        raise ValueError(f"weights: {sorted(repeated)} given more than once")
    return roots


def _check_same(component: str, holders: list[Path]):
    """Refuse when the copies of ``component`` in several folders are not the same weights (or files)."""
    if len(holders) < 2:
        return
    by_digest: dict[str, list[str]] = {}
    for path in holders:
        by_digest.setdefault(component_digest(path), []).append(str(path))
    if len(by_digest) > 1:
        groups = "; ".join(" = ".join(paths) for paths in by_digest.values())
        raise ValueError(f"{component}: the weights folders hold different copies of it ({groups}). A pipeline "
                         f"needs one {component}: drop the folder whose {component} is not the one you want, or "
                         f"train both stages with the same {component} (the same *_checkpoint_path / encoders)")


def locate(roots: list[Path], component: str, lite: bool, dtype: str):
    """``(path, is_converted)`` of ``component`` in the first folder that holds it, or None; every other
    folder holding it must hold the same weights."""
    found = [hit for root in roots if (hit := find_source(root, component, lite, dtype)) is not None]
    _check_same(component, [path for path, _ in found])
    return found[0] if found else None


def holder(roots: list[Path], component: str, lite: bool, dtype: str) -> Path | None:
    """The first folder holding ``component``."""
    return next((root for root in roots if find_source(root, component, lite, dtype) is not None), None)


def tokenizer_folder(roots: list[Path]) -> Path:
    """The one tokenizer of the folders; a local folder without one gets local advice (nothing to download)."""
    holders = [root / TOKENIZER for root in roots if (root / TOKENIZER).is_dir()]
    if not holders:
        where = roots[0] if len(roots) == 1 else ", ".join(str(r) for r in roots)
        raise FileNotFoundError(f"{where}: no tokenizer/ folder (the CLIP tokenizer files vocab.json, merges.txt, "
                                "tokenizer_config.json). A trainer's export holds the tokenizer it trained with and "
                                "a download of the released weights holds tokenizer/: add the folder that has it "
                                "(another --weights), or copy its tokenizer/ here")
    _check_same(TOKENIZER, holders)
    return holders[0]


def missing_messages(roots: list[Path], missing: list[str], lite: bool) -> str:
    """What to do about components none of the folders holds."""
    if len(roots) == 1 and read_export_manifest(roots[0]) is None:
        return "\n".join(missing_message(roots[0], c, lite) for c in missing)
    held = {str(root): (read_export_manifest(root) or {}).get("trained") for root in roots}
    exports = ", ".join(f"{root} (an export of {trained})" for root, trained in held.items() if trained)
    return (f"no weights for {', '.join(missing)} in {', '.join(str(r) for r in roots)}"
            + (f"; {exports}" if exports else "") + ". Add the folder that holds them: e.g. a Stage C export "
            "samples with the Stage B export that holds Stage B and Stage A: --weights C_EXPORT --weights B_EXPORT "
            "(from_pretrained([C_EXPORT, B_EXPORT])), or the released weights' folder")


def sampling_defaults(roots: list[Path], lite: bool, dtype: str, sampling_dirs: dict | None = None) -> dict:
    """{"prior": settings, "decoder": settings}: each stage's from the sampling.json of the folder holding it
    (or of the folder ``sampling_dirs`` names for it: a named set's own, e.g. demo-lcm's)."""
    out = {}
    for stage, component in (("prior", "stage_c"), ("decoder", "stage_b")):
        root = holder(roots, component, lite, dtype) or roots[0]
        out[stage] = read_sampling_defaults((sampling_dirs or {}).get(root, root))[stage]
    return out
