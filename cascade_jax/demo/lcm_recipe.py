"""The recipe of ``demo-lcm`` (``train/demo_lcm.py``, ``make demo-lcm-weights``): the embedded demo's Stage C
distilled by the ``c_lcm`` task into an LCM-LoRA, shipped beside the demo weights.

1. ``data``: the demo's generated shapes images (training split only), as ``make demo-weights`` makes them.
2. ``distil``: one run of ``cascade_jax.training.train`` from ``configs/training/demo_lcm.yaml``, the teacher
   and the frozen encoders read from the demo weights folder.
3. ``publish``: the LoRA (the EMA target network's, as the paper keeps) and ``SAMPLING`` as sampling.json into
   ``cascade_jax/demo/lcm/``, in one rename. ``--weights demo-lcm`` is the demo weights with that LoRA merged
   and those sampler settings (``cascade_jax.demo`` registers the name).

Steps with a report in ``work/reports`` are skipped and the trainer resumes from its checkpoints.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cascade_jax import demo
from cascade_jax.demo import shapes
from cascade_jax.pipelines.defaults import write_sampling_defaults
from cascade_jax.storage import atomic

CONFIG = "demo_lcm"
# demo-lcm's defaults: Stage C with the LCM sampler in 4 steps and no guidance (distilled into the LoRA: an
# unconditional pass would only cost time), Stage B as the demo samples it but in 2 steps
# (cascade_jax/demo/evaluate/lcm.py measures these against the demo's 20+10, and the alternatives docs/lcm.md names).
SAMPLING = {"prior": {"sampler": "lcm", "steps": 4, "cfg": None},
            "decoder": {"steps": 2, "t_start": 0.9, "cfg": 1.75}}


def overrides(work: Path, weights: Path, scale: float, updates: int) -> list[str]:
    paths = {"checkpoint_path": work / "checkpoints", "output_path": work / "output",
             "generator_checkpoint_path": weights / "stage_c", "effnet_checkpoint_path": weights / "effnet",
             "clip_text_model_name": weights / "text_encoder", "clip_image_model_name": weights / "image_encoder",
             "tokenizer_path": weights / "tokenizer"}
    values = [f"{k}={v}" for k, v in paths.items()]
    values.append(f"data={{source: folder, paths: [{work / 'data'}]}}")
    if scale != 1.0:
        values.append(f"updates={max(2, round(updates * scale))}")
    return values


def distil(work: Path, weights: Path, scale: float, log) -> dict:
    """Train the LCM-LoRA; returns its report (time, losses) and leaves the LoRA in work/lcm_lora.safetensors."""
    from cascade_jax.training import load_config, train
    from cascade_jax.training.lcm import LCMTask, task_params

    cfg = load_config(CONFIG, overrides(work, weights, scale, load_config(CONFIG).updates))
    task = LCMTask()
    start = time.perf_counter()
    run = train(cfg, task=task)
    seconds = time.perf_counter() - start
    written = task.write_lora(cfg, task_params(run.state), cfg.updates)
    with atomic.replacing(work / "lcm_lora.safetensors") as tmp:
        shutil.copyfile(written, tmp)
    losses = [h["loss"] for h in run.history if "loss" in h]
    k = max(1, len(losses) // 10)
    report = {"seconds": round(seconds, 1), "updates": cfg.updates, "batch_size": cfg.batch_size,
              "loss_first": sum(losses[:k]) / k if losses else None,
              "loss_last": sum(losses[-k:]) / k if losses else None}
    log(f"distil: {json.dumps(report)}")
    return report


def publish(work: Path, out: Path):
    """The LoRA and sampling.json into ``out`` in one rename."""
    with atomic.replacing(out) as tmp:
        tmp.mkdir()
        shutil.copyfile(work / "lcm_lora.safetensors", tmp / demo.LCM_LORA_FILE)
        write_sampling_defaults(tmp, SAMPLING)


def build_demo_lcm(work=Path("demo_build/lcm"), out=demo.LCM_DIR, weights=None, *, images: int = 4000,
                   scale: float = 1.0, seed: int = 0, log=print) -> dict:
    """Run the recipe (module docstring); returns every step's report."""
    work, out = Path(work), Path(out)
    weights = Path(weights) if weights is not None else demo.weights_dir()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    steps = {"data": lambda: shapes.write_folder(work / "data", images, seed, size=demo.IMAGE_SIZE) and None,
             "distil": lambda: distil(work, weights, scale, log)}
    for name, step in steps.items():
        report = work / "reports" / f"{name}.json"
        if report.is_file():
            log(f"{name}: done before, skipped")
            continue
        log(f"{name}: running")
        begin = time.perf_counter()
        entry = step() or {}
        entry.setdefault("seconds", round(time.perf_counter() - begin, 1))
        report.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(report, json.dumps(entry, indent=1))
    publish(work, out)
    result = {p.stem: json.loads(p.read_text()) for p in sorted((work / "reports").glob("*.json"))}
    result["this_run_seconds"] = round(time.perf_counter() - start, 1)
    atomic.write_text(work / "demo_lcm_report.json", json.dumps(result, indent=1))
    return result
