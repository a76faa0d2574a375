"""benchmarks/sizing.py, the README's "Sizing a TPU run" table: merging the cells of runs made apart (other
processes or machines, each with its own --out), and the table's rows for cells planned, failed and not run.

Plans nothing: the cells are written by hand in the script's own format (its compiles are tested through
``--plan`` in tests/test_plan.py).
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "sizing.py"


def planned(label, slice_, batch, peak, step_s, mfu):
    return {"label": label, "slice": slice_, "date": "2026-12-08", "fits": True, "batch_per_chip": batch,
            "peak_gib_per_device": peak, "hbm_gib_per_device": 95, "estimated_step_s": step_s, "estimated_mfu": mfu}


def write(path: Path, training=(), sampling=()):
    path.write_text(json.dumps({"training": list(training), "sampling": list(sampling)}))
    return path


def sizing(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_merge_keeps_every_cell_and_replaces_a_cell_planned_again(tmp_path):
    out = write(tmp_path / "sizing.json", [planned("Stage C 3.6B full finetune", "v5p-16", 72, 82.5, 3.87, 0.496),
                                           {"label": "Stage B 700M", "slice": "v5p-16", "error": "exit 1"}])
    other = write(tmp_path / "other.json", [planned("Stage B 700M", "v5p-16", 42, 80.2, 1.5, 0.41),
                                            planned("Stage C 3.6B full finetune", "v6e-8", 9, 28.1, 2.0, 0.5)])
    run = sizing("--merge", other, "--out", out, "--no-readme")
    assert run.returncode == 0, run.stderr[-2000:]
    cells = {(c["label"], c["slice"]): c for c in json.loads(out.read_text())["training"]}
    assert cells[("Stage B 700M", "v5p-16")]["batch_per_chip"] == 42  # the failed cell, planned again elsewhere
    assert cells[("Stage C 3.6B full finetune", "v5p-16")]["batch_per_chip"] == 72  # kept
    assert ("Stage C 3.6B full finetune", "v6e-8") in cells
    table = out.with_suffix(".md").read_text()
    assert "| Stage C 3.6B full finetune | v6e-8 | yes | 28.1 / 95 | 9 | 2 | 50% |" in table
    assert "| Stage B 700M | v5p-16 | yes | 80.2 / 95 | 42 | 1.5 | 41% |" in table
    # every other cell of the grid is a row that says it was not planned
    assert "| Stage B 1.5B | v4-8 | not run: not yet planned on this machine |" in table


def test_merge_refuses_a_file_that_is_not_a_sizing_table_by_name(tmp_path):
    out = write(tmp_path / "sizing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"slice": "v5p-16"}]}))
    run = sizing("--merge", bad, "--out", out, "--no-readme")
    assert run.returncode != 0
    assert "bad.json" in run.stderr and "not a sizing.json" in run.stderr
    assert json.loads(out.read_text()) == {"training": [], "sampling": []}  # untouched
