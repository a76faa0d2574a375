"""The recipe of the embedded demo cascade (``train/demo.py``, ``make demo-weights``).

From nothing to a cascade that draws what its prompt says, with this project's own trainers:

1. ``data``: generated 128x128 images of coloured shapes with captions (``cascade_jax.demo.shapes``),
   training split only; the held-out combinations are never drawn.
2. ``encoders``: the demo tokenizer (the grammar's words, ``word_tokenizer``) and frozen random
   CLIP text / CLIP image encoders: the text encoder only has to tell the grammar's words and their
   places apart, which a random transformer with position embeddings does.
   ``effnet``: the EfficientNet starts random with BatchNorm statistics calibrated on the data, then
   trains as the encoder of an autoencoder whose decoder is a Previewer (``demo_effnet``): a random
   encoder keeps the background and position but loses the shape's colour, which Stage C would
   then never see. Its latent normaliser is refitted afterwards (unit-variance Stage C latents).
3. ``stage_a`` (VQGAN, reconstruction), ``stage_b`` (on Stage A's latents), ``stage_c`` and the
   ``previewer`` (fine-tuned from the encoder's decoder): each one run of ``cascade_jax.training.train`` from ``configs/training/demo_*.yaml``.
4. ``assemble``: the EMA weights (where the config keeps an EMA) and the encoders into one folder in the
   layout ``StableCascadePipeline.from_pretrained`` reads, with the sampler settings it samples best with
   (``SAMPLING``, its sampling.json), published with one rename.

Every step is skipped when its output exists, and the trainers resume from their checkpoints, so a
killed build continues where it stopped. ``scale`` multiplies every stage's updates (tests run the
whole recipe with a few updates).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from cascade_jax import demo
from cascade_jax.demo import parallel as pool
from cascade_jax.demo import shapes
from cascade_jax.demo.word_tokenizer import write_word_tokenizer_folder
from cascade_jax.models.random_init import random_model
from cascade_jax.nn.params import named_variables
from cascade_jax.pipelines.defaults import write_sampling_defaults
from cascade_jax.pipelines.loading import pipeline_set
from cascade_jax.storage import atomic
from cascade_jax.weights import checkpoint
from cascade_jax.weights.checkpoint import META_FILE

ENCODERS = ("text_encoder", "image_encoder", "effnet")
# stage -> (training config, the pipeline component it becomes)
TRAINED = {"stage_a": "demo_a", "stage_b": "demo_b", "stage_c": "demo_c", "previewer": "demo_previewer"}
CALIBRATION_IMAGES = 256
TOKENIZER_MAX_LENGTH = 24  # the longest caption is 13 tokens with <|startoftext|> and <|endoftext|>
# The shipped cascade's sampling.json: changes to the official sampler settings, chosen on the seen combinations
# with cascade_jax.demo.evaluate.accuracy (the first step at t 0.9: at t 1 the tiny Stage B's error is amplified
# into speckles; guidance 1.75: the best margin over shape, colour and place). The sweeps: docs/demo_project.md.
SAMPLING = {"decoder": {"t_start": 0.9, "cfg": 1.75}}


def vocabulary() -> list[str]:
    """Every word of the shapes grammar."""
    return sorted({word for combo in shapes.ALL_COMBOS for word in shapes.caption(combo).split()})


def save_module(model, model_name: str, config: dict, out_dir: Path, source: str):
    arrays = {k: np.asarray(v[...]) for k, v in named_variables(model).items()}
    meta = {"model": model_name, "config": config, "dtype": "float32", "source": {"path": source}}
    checkpoint.save(out_dir, meta, arrays, overwrite=True)


def build_encoders(work: Path, data_dir: Path, seed: int):
    """The tokenizer folder and the frozen random encoders (EfficientNet calibrated on ``data_dir``)."""
    from PIL import Image

    from cascade_jax.demo.calibrate import calibrated_effnet

    out = work / "encoders"
    components = pipeline_set("demo")
    tokenizer = out / "tokenizer"
    if not (tokenizer / "vocab.json").is_file():
        with atomic.replacing(tokenizer) as tmp:
            write_word_tokenizer_folder(vocabulary(), tmp, model_max_length=TOKENIZER_MAX_LENGTH)
    for i, name in enumerate(ENCODERS):
        if (out / (name + "_random" if name == "effnet" else name) / META_FILE).is_file():
            continue
        model_name, config = components[name]
        if name == "effnet":  # BatchNorm statistics of the data at 96x96 (what Stage C trains on)
            files = sorted(data_dir.glob("*.png"))[:CALIBRATION_IMAGES]
            images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((96, 96), Image.BICUBIC))
                               for f in files])
            calibrated_effnet(config, images, seed=seed + 1 + i, out_dir=out / "effnet_random")
            continue
        model = random_model(model_name, config, seed=seed + 1 + i)
        save_module(model, model_name, config, out / name, f"cascade_jax demo recipe: random (seed {seed + 1 + i})")


def stage_overrides(work: Path, stage: str, scale: float, updates: dict) -> list[str]:
    paths = {"checkpoint_path": work / "checkpoints", "output_path": work / "output",
             "effnet_checkpoint_path": work / "encoders" / "effnet",
             "clip_text_model_name": work / "encoders" / "text_encoder",
             "clip_image_model_name": work / "encoders" / "image_encoder",
             "tokenizer_path": work / "encoders" / "tokenizer",
             "stage_a_checkpoint_path": work / "trained" / "stage_a"}
    if stage == "effnet":  # it starts from the random, calibrated encoder and makes encoders/effnet
        paths["effnet_checkpoint_path"] = work / "encoders" / "effnet_random"
    if stage == "previewer":  # fine-tuned from the decoder that trained the encoder
        paths["generator_checkpoint_path"] = work / "trained" / "effnet_decoder"
    overrides = [f"{k}={v}" for k, v in paths.items()]
    overrides.append(f"data={{source: folder, paths: [{work / 'data'}]}}")
    if scale != 1.0:
        overrides.append(f"updates={max(2, round(updates[stage] * scale))}")
    return overrides


def train_stage(work: Path, stage: str, scale: float, log) -> dict:
    """Train one stage from its demo config; returns its losses and time. The model lands in trained/."""
    from cascade_jax.training import export_run, load_config, train

    config_name = TRAINED.get(stage, f"demo_{stage}")
    base = load_config(config_name)
    cfg = load_config(config_name, stage_overrides(work, stage, scale, {stage: base.updates}))
    start = time.perf_counter()
    run = train(cfg)
    seconds = time.perf_counter() - start
    exported = export_run(run, work / "output" / cfg.experiment_id / "export")
    chosen = exported.get("generator_ema", exported["generator"])[0]
    if stage == "effnet":
        save_trained_effnet(run, work)
    target = work / "trained" / ("effnet_decoder" if stage == "effnet" else stage)
    with atomic.replacing(target) as tmp:
        shutil.copytree(chosen, tmp)
    losses = [h["loss"] for h in run.history if "loss" in h]  # unsmoothed, of the logged updates
    k = max(1, len(losses) // 10)
    report = {"seconds": round(seconds, 1), "updates": cfg.updates, "batch_size": cfg.batch_size,
              "logged_from_update": run.history[0]["step"] if run.history else None,
              "loss_first": float(np.mean(losses[:k])) if losses else None,
              "loss_last": float(np.mean(losses[-k:])) if losses else None,
              "weights": "ema" if "generator_ema" in exported else "final"}
    log(f"{stage}: {json.dumps(report)}")
    return report


def save_trained_effnet(run, work: Path):
    """The encoder trained in the ``effnet`` step, its final BatchNorm (the latent normaliser) refitted to
    the data so Stage C's latents are unit-variance again, as encoders/effnet."""
    import jax.numpy as jnp
    from flax import nnx
    from PIL import Image

    from cascade_jax.demo.calibrate import effnet_inputs

    effnet = nnx.merge(run.graphdef, run.state.params, run.frozen).effnet
    files = sorted((work / "data").glob("*.png"))[:CALIBRATION_IMAGES]
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((96, 96), Image.BICUBIC)) for f in files])
    features = effnet.mapper[0](effnet.backbone(jnp.asarray(effnet_inputs(images), jnp.float32)))
    norm = effnet.mapper[1]
    norm.running_mean.value = jnp.mean(features, axis=(0, 1, 2)).astype(norm.running_mean.value.dtype)
    norm.running_var.value = jnp.var(features, axis=(0, 1, 2)).astype(norm.running_var.value.dtype)
    model_name, config = pipeline_set("demo")["effnet"]
    save_module(effnet, model_name, config, work / "encoders" / "effnet", "cascade_jax demo recipe: trained "
                "(demo_effnet, as the Previewer's encoder)")


def assemble(work: Path, out: Path):
    """Copy the trained stages, encoders and tokenizer, with SAMPLING as sampling.json, into ``out`` in one rename."""
    with atomic.replacing(out) as tmp:
        tmp.mkdir()
        for name in TRAINED:
            shutil.copytree(work / "trained" / name, tmp / name)
        for name in (*ENCODERS, "tokenizer"):
            shutil.copytree(work / "encoders" / name, tmp / name)
        write_sampling_defaults(tmp, SAMPLING)


def _run_step(work: Path, name: str, step, log):
    """Run ``step``; its report (time, losses) goes to work/reports/NAME.json."""
    log(f"{name}: running")
    start, cpu = time.perf_counter(), time.process_time()
    entry = step() or {}
    entry.setdefault("seconds", round(time.perf_counter() - start, 1))
    entry["cpu_seconds"] = round(time.process_time() - cpu, 1)
    report = _report_path(work, name)
    report.parent.mkdir(parents=True, exist_ok=True)
    _write_json(report, entry)


def _report_path(work: Path, name: str) -> Path:
    return work / "reports" / f"{name}.json"


def _skip_done(work: Path, names, log) -> list:
    """The steps of ``names`` without a report (a report means done: logged as skipped)."""
    todo = []
    for name in names:
        if _report_path(work, name).is_file():
            log(f"{name}: done before, skipped")
        else:
            todo.append(name)
    return todo


def _train_pinned(work: str, scale: float, stage: str, cpus=None):
    pool.pin(cpus)
    work = Path(work)
    _run_step(work, stage, lambda: train_stage(work, stage, scale, print), print)


def train_all(work: Path, scale: float, parallel: bool, log):
    """Every stage of ``parallel.NEEDS`` not done yet: in order in this process, or (``parallel``) in spawned
    processes (``cascade_jax.demo.parallel``)."""
    todo = _skip_done(work, pool.NEEDS, log)
    if not parallel:
        for stage in todo:
            _run_step(work, stage, lambda stage=stage: train_stage(work, stage, scale, log), log)
        return
    with pool.huge_pages_for_children():
        failed = pool.run_parallel(todo, _train_pinned, (str(work), scale))
    if failed:
        raise RuntimeError(f"training {failed} failed (see the log above); run again to resume")


def build_demo(work=Path("demo_build"), out=demo.WEIGHTS_DIR, *, images: int = 6000, scale: float = 1.0,
               seed: int = 0, parallel: bool = True, log=print) -> dict:
    """Run the whole recipe (see the module docstring); returns the report of every step."""
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    steps = {"data": lambda: shapes.write_folder(work / "data", images, seed, size=demo.IMAGE_SIZE) and None,
             "encoders": lambda: build_encoders(work, work / "data", seed)}
    for name in _skip_done(work, steps, log):
        _run_step(work, name, steps[name], log)
    train_all(work, scale, parallel, log)
    assemble(work, out)
    report = {p.stem: json.loads(p.read_text()) for p in sorted((work / "reports").glob("*.json"))}
    report["this_run_seconds"] = round(time.perf_counter() - start, 1)
    _write_json(work / "demo_report.json", report)
    return report


def _write_json(path: Path, value):
    atomic.write_text(path, json.dumps(value, indent=1))
