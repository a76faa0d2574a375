"""Compare two builds of the demo recipe bit for bit: ``python -m cascade_jax.demo.compare_builds A B``.

A change that should move code and not arithmetic (a refactor of the recipe, the trainers or the library
under them) is checked by running the recipe's smoke build before and after (``train/demo.py --images 48
--scale 0.0005``: a few updates per stage) and comparing every array both left behind: each converted model
folder (``cascade_model.json`` beside its Orbax weights), each ``.safetensors`` file, each generated image and
caption, and the losses in each step's report. Prints one line per compared item; exits 1 on any difference
or on an item only one build has.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cascade_jax.weights.checkpoint import META_FILE, load_arrays
from cascade_jax.weights.safetensors_io import SafetensorsReader

REPORT_NUMBERS = ("updates", "batch_size", "logged_from_update", "loss_first", "loss_last", "weights")


def items(root: Path) -> dict[str, Path]:
    """Relative path -> path of what is compared: model folders, safetensors, images, captions, reports."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if any(part.startswith(".") for part in path.relative_to(root).parts) or "checkpoints" in path.parts:
            continue  # temp entries; the trainers' resumable checkpoints (their finished models are compared)
        if any((parent / META_FILE).is_file() for parent in path.parents):
            continue  # inside a model folder (compared as arrays; Orbax's marker files hold paths and times)
        if path.is_dir() and (path / META_FILE).is_file():
            found[relative] = path
        elif path.suffix in (".safetensors", ".png", ".txt") or (path.suffix == ".json" and "reports" in path.parts):
            found[relative] = path
    return found


def arrays_of(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        return load_arrays(path)
    if path.suffix == ".safetensors":
        reader = SafetensorsReader(path)
        return {key: reader.get(key) for key in reader.keys()}
    if path.suffix == ".json":
        report = json.loads(path.read_text())
        return {key: np.asarray(report[key]) for key in REPORT_NUMBERS if key in report}
    return {"bytes": np.frombuffer(path.read_bytes(), np.uint8)}


def differences(a: dict, b: dict) -> list[str]:
    found = [f"{key}: only in one build" for key in sorted(set(a) ^ set(b))]
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            found.append(f"{key}: {x.dtype}{x.shape} vs {y.dtype}{y.shape} differ")
    return found


def compare(first: Path, second: Path, log=print) -> int:
    """The number of differing items (0: the builds are identical in every compared array)."""
    a, b = items(first), items(second)
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            log(f"DIFF {name}: only in {first if name in a else second}")
            bad += 1
            continue
        left = arrays_of(a[name])
        diff = differences(left, arrays_of(b[name]))
        log(f"{'DIFF' if diff else 'same'} {name} ({len(left)} arrays){': ' + '; '.join(diff[:3]) if diff else ''}")
        bad += bool(diff)
    log(f"{len(set(a) | set(b))} items compared, {bad} differ")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path, help="a build's work or output folder")
    p.add_argument("second", type=Path, help="the other build's same folder")
    args = p.parse_args(argv)
    for folder in (args.first, args.second):
        if not folder.is_dir():
            p.error(f"{folder} is not a folder")
    return 1 if compare(args.first, args.second) else 0


if __name__ == "__main__":
    sys.exit(main())
