"""Evaluation of the demo cascade (the shapes scorer applied to what it draws): each module is a command,
``python -m cascade_jax.demo.evaluate.NAME --help`` (accuracy, stages, probe, grid, lcm). Results go beside
the project's other measurements, ``benchmarks/results/demo_NAME.json`` / ``.md``, unless ``--out`` says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cascade_jax.storage import atomic

RESULTS_DIR = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def write_text(path, text: str):
    atomic.write_text(Path(path), text)  # a killed run leaves the old result


def write_report(out, report: dict, table: str):
    """``report`` as JSON to ``out`` and ``table`` (markdown) beside it as .md; the table is printed."""
    write_text(out, json.dumps(report, indent=1))
    write_text(Path(out).with_suffix(".md"), table)
    print(table)


def load_pipeline(weights: str, dtype: str = "float32"):
    """``StableCascadePipeline.from_pretrained(weights)``, or None after printing why it cannot load."""
    from cascade_jax.pipelines.cascade import StableCascadePipeline

    try:
        return StableCascadePipeline.from_pretrained(weights, dtype=dtype)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
