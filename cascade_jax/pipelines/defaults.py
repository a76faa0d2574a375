"""The pipeline's default sampler settings, and a weights folder's own recommendation of them.

``PRIOR_DEFAULTS`` / ``DECODER_DEFAULTS`` are the official settings (see ``cascade``). A weights folder
may hold ``sampling.json`` with the settings its models were measured best with, as changes to those
defaults, e.g. ``{"decoder": {"t_start": 0.9, "cfg": 3.0}}``; ``from_pretrained`` makes them that
pipeline's defaults (what a call without ``prior=`` / ``decoder=`` uses). The embedded demo cascade
ships one: its tiny Stage B follows its latents better with a stronger guidance and without the first
step at t = 1 (measured by the demo's accuracy evaluation).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

from cascade_jax.diffusion import STAGE_B_DEFAULTS, STAGE_C_DEFAULTS, SamplerSettings
from cascade_jax.storage import atomic

PRIOR_DEFAULTS = STAGE_C_DEFAULTS.replace(cfg_std_per_sample=True)
DECODER_DEFAULTS = STAGE_B_DEFAULTS.replace(cfg_std_per_sample=True)
OFFICIAL = {"prior": PRIOR_DEFAULTS, "decoder": DECODER_DEFAULTS}
FILE_NAME = "sampling.json"
# Every field but the noise schedule (a GDF object, not JSON): plain numbers, strings and flags.
FIELDS = tuple(f.name for f in dataclasses.fields(SamplerSettings) if f.name != "gdf")


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def settings_from_changes(changes: dict, where: str) -> dict[str, SamplerSettings]:
    """{"prior": {...}, "decoder": {...}} (either may be absent) -> both stages' SamplerSettings, the
    official ones with those changes. Errors name ``where`` (the file) and the key."""
    if not isinstance(changes, dict):
        raise ValueError(f"{where}: expected an object with 'prior' and/or 'decoder', got {type(changes).__name__}")
    for stage in changes:
        if stage not in OFFICIAL:
            raise ValueError(f"{where}: unknown stage {stage!r}{_closest(str(stage), OFFICIAL)}; "
                             "use 'prior' (Stage C) and/or 'decoder' (Stage B)")
    out = {}
    for stage, base in OFFICIAL.items():
        fields = changes.get(stage, {})
        if not isinstance(fields, dict):
            raise ValueError(f"{where}: {stage!r} must be an object of sampler settings, got {fields!r}")
        for key in fields:
            if key not in FIELDS:
                raise ValueError(f"{where}: unknown {stage} setting {key!r}{_closest(str(key), FIELDS)}; "
                                 f"valid: {', '.join(FIELDS)}")
        try:
            out[stage] = base.replace(**fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {stage}: {e}") from None
    return out


def read_sampling_defaults(root: Path) -> dict[str, SamplerSettings]:
    """The "prior" and "decoder" defaults of the weights folder ``root``: its sampling.json applied to the
    official settings (the official settings alone when it has none)."""
    path = Path(root) / FILE_NAME
    if not path.is_file():
        return dict(OFFICIAL)
    try:
        changes = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}); fix or delete it to use the official settings") from None
    return settings_from_changes(changes, str(path))


def write_sampling_defaults(root: Path, changes: dict) -> Path:
    """Write ``changes`` (checked as ``read_sampling_defaults`` will read them) to root/sampling.json atomically."""
    path = Path(root) / FILE_NAME
    settings_from_changes(changes, str(path))
    atomic.write_text(path, json.dumps(changes, indent=2, sort_keys=True) + "\n")
    return path

