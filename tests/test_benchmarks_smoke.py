"""The benchmark entry points still run: ``run_cpu.py`` (tiny dry run: every section planned, the
summary written) and ``gpu.sh --tiny`` (every GPU part, tiny models, on the CPU). A refactor that
breaks an import or a call in benchmarks/ fails here instead of on the next lent GPU.

Results go to a temporary folder; benchmarks/results/ is never written.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def errors_in(value, where="") -> list[str]:
    """Every ``error`` entry anywhere in a results tree (parts record failures instead of raising)."""
    if isinstance(value, dict):
        found = [f"{where}: {value['error']}"] if "error" in value else []
        return found + [e for k, v in value.items() if k != "error" for e in errors_in(v, f"{where}/{k}")]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in errors_in(v, f"{where}[{i}]")]
    return []


# What these entry points write by default; other benchmarks may write beside them meanwhile.
DEFAULT_OUTPUTS = ["machine.json", "forward.json", "pipeline.json", "convert.json", "train.json", "train_torch.json",
                   "summary.md",
                   "tiny", "dry_run", "gpu_tiny"]


def _stamps() -> dict:
    paths = [RESULTS / name for name in DEFAULT_OUTPUTS]
    files = [q for p in paths for q in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else [])]
    return {q: q.stat().st_mtime_ns for q in files}


@pytest.fixture
def results_untouched():
    before = _stamps()
    yield
    assert _stamps() == before, "a smoke test wrote into benchmarks/results"


def test_run_cpu_tiny_dry_run_plans_every_section(tmp_path, results_untouched):
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, "benchmarks/run_cpu.py", "--tiny", "--dry-run", "--results", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for section in ("forward", "pipeline", "convert", "train", "train_torch"):
        data = json.loads((out / f"{section}.json").read_text())
        assert errors_in(data["results"]) == [], section
    assert "failed" not in (out / "summary.md").read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="gpu.sh is a bash script")
def test_gpu_script_tiny_mode_runs_every_part_on_the_cpu(tmp_path, results_untouched):
    env = {**os.environ, "OUT": str(tmp_path / "gpu"), "JAX_PLATFORMS": "cpu", "BENCH_DEADLINE_S": "500",
           "BENCH_TIMEOUT_S": "560"}
    result = subprocess.run(["bash", "benchmarks/gpu.sh", "--tiny"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    data = json.loads((tmp_path / "gpu" / "gpu_results.json").read_text())
    expected = {"environment", "build_jax_models", "jax_stage_c", "torch_stage_c", "jax_stage_b", "torch_stage_b",
                "jax_stage_a", "torch_stage_a", "train_stage_c"}
    assert expected <= set(data["parts"])
    skipped = [name for name in expected if "skipped" in data["parts"][name]]
    assert skipped == [], skipped
    assert errors_in(data["parts"]) == []
    assert (tmp_path / "gpu" / "gpu_summary.md").is_file()


def test_the_training_dry_run_table_compiles_a_sharded_step(tmp_path):
    """benchmarks/dry_run.py --tiny: tiny_c's step compiled for 8 simulated devices (FSDP 8) in a child
    process; the report has XLA's per-device memory and the step's FLOPs."""
    out = tmp_path / "dry_run.json"
    run = subprocess.run([sys.executable, "benchmarks/dry_run.py", "--tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (case,) = json.loads(out.read_text())["cases"]
    assert case["devices"] == 8 and case["mesh"]["fsdp"] == 8, case
    assert case["argument_gib_per_device"] > 0 and case["flops_per_step_per_device"] > 0, case
    assert "| tiny C, FSDP 8 | 8 | fsdp 8 |" in out.with_suffix(".md").read_text()



def test_every_default_train_variant_loads_its_config():
    """The dry run uses the tiny configs only; a config check that refuses a lite variant's overrides (as
    ``init: scratch`` beside a checkpoint path once did) must fail here, not 15 minutes into ``make bench``."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_train import variant_config
    from benchmarks.cpu_sections import TRAIN_DEFAULT

    for _, config, batch, size, remat, cached in TRAIN_DEFAULT:
        cfg = variant_config(config, batch=batch, image_size=size, remat=remat, cached=cached)
        assert (cfg.init, cfg.generator_checkpoint_path, cfg.batch_size) == ("scratch", None, batch), config
