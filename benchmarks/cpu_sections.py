"""Which cases each mode of ``run_cpu.py`` runs (default, quick, full, tiny), and in what order.

Order is priority: under a budget the later cases are the ones skipped (with the reason).
"""

from __future__ import annotations

from benchmarks.bench_convert import run_convert_section
from benchmarks.bench_forward import STAGE_SHAPES, abstract_flops, run_forward_section
from benchmarks.bench_pipeline import run_pipeline_section
from benchmarks.bench_train import run_train_section
from benchmarks.bench_train_torch import run_train_torch_section

PRESETS = {"stage_c_lite": "Stage C lite (1B)", "stage_b_lite": "Stage B lite (700M)",
           "stage_c": "Stage C (3.6B)", "stage_b": "Stage B (1.5B)"}
TINY_SHAPES = {"stage_c": (24, 24, 16), "stage_b": (64, 64, 4)}


def _preset(name: str):
    from cascade_jax.models.registry import load_config
    return load_config(name)


def _tiny(component: str):
    from cascade_jax.pipelines.loading import pipeline_set
    return pipeline_set("tiny")[component]


def forward(budget, mode: str, gflops: float) -> list[dict]:
    if mode == "tiny":
        cases = [dict(label=f"tiny {c}", model=_tiny(c)[0], config=_tiny(c)[1], batch=b, shape=TINY_SHAPES[c],
                      breakdown=b == 1, max_rounds=3, case_budget_s=20, depthwise_rounds=2 if b == 1 else 0)
                 for c in ("stage_c", "stage_b") for b in (1, 2)]
        return run_forward_section(cases, budget, gflops)
    # Every configuration at batch 1 first, then batch 2: under the budget the batch-2 cases go first.
    order = [("stage_c_lite", 1), ("stage_c", 1), ("stage_b_lite", 1), ("stage_b", 1),
             ("stage_c_lite", 2), ("stage_b_lite", 2), ("stage_c", 2), ("stage_b", 2)]
    cases = []
    for preset, batch in order:
        model, config = _preset(preset)
        lite, case = preset.endswith("lite"), dict(label=PRESETS[preset], model=model, config=config, batch=batch,
                                                   shape=STAGE_SHAPES[model])
        if mode == "full":
            case.update(max_rounds=5, case_budget_s=900, breakdown=batch == 1, depthwise_rounds=3)
        elif mode == "quick":
            case.update(max_rounds=1, case_budget_s=60)
            if not (lite and batch == 1):
                case["skip_reason"] = "not in the --quick set"
        else:
            case.update(max_rounds=3 if lite and batch == 1 else 2 if lite else 1, case_budget_s=110 if lite else 150,
                        breakdown=lite and batch == 1, depthwise_rounds=1 if lite and batch == 1 else 0)
        cases.append(case)
    return run_forward_section(cases, budget, gflops)


def lite_flops_1024(set_name: str = "lite") -> dict:
    from cascade_jax.pipelines.loading import pipeline_set
    components = pipeline_set(set_name)
    return {stage: abstract_flops(*components[stage], 1, STAGE_SHAPES[stage]) for stage in ("stage_c", "stage_b")}


def pipeline(budget, mode: str, gflops: float, size: int | None) -> dict:
    if mode == "tiny":
        return run_pipeline_section(budget, gflops, lite_flops_1024("tiny"), set_name="tiny", size=size or 256,
                                    section_budget_s=budget.remaining())
    return run_pipeline_section(budget, gflops, lite_flops_1024(), set_name="lite", size=size,
                                section_budget_s=budget.remaining())


def convert(budget, mode: str, scratch: str | None) -> list[dict]:
    if mode == "tiny":
        targets = [("tiny_stage_c", *_tiny("stage_c")), ("tiny_stage_b", *_tiny("stage_b"))]
    else:
        targets = [("stage_c_lite", *_preset("stage_c_lite")), ("stage_b", *_preset("stage_b"))]
        if mode == "quick":
            targets = targets[:1]
        if mode == "full":
            targets.append(("stage_c", *_preset("stage_c")))
    return run_convert_section(budget, targets, scratch_dir=scratch)


# Training variants: (label, config, batch, image size, remat, cached conditions), in priority order.
TRAIN_TINY = [("tiny C", "tiny_c", 4, 256, "none", False), ("tiny C", "tiny_c", 4, 256, "none", True),
              ("tiny B", "tiny_b", 4, 256, "none", False), ("tiny B", "tiny_b", 4, 256, "none", True)]
# Lite last: on the shared 2-core, 24 GiB machine it did not finish (see benchmarks/README.md).
TRAIN_DEFAULT = TRAIN_TINY + [
    ("tiny C", "tiny_c", 4, 256, "full", False), ("tiny C", "tiny_c", 4, 256, "full", True),
    ("tiny B", "tiny_b", 4, 256, "full", False), ("tiny B", "tiny_b", 4, 256, "full", True),
    ("lite C (1B)", "finetune_c_1b", 2, 256, "full", True), ("lite B (700M)", "finetune_b_700m", 1, 256, "full", False),
    ("lite C (1B)", "finetune_c_1b", 2, 256, "none", True), ("lite B (700M)", "finetune_b_700m", 1, 256, "none", False)]


def train(budget, mode: str, gflops: float, peak: dict, train_lite: bool) -> list[dict]:
    """The library's train step (bench_train.py): tiny and lite Stage C / Stage B, remat none / full,
    with and without cached conditions; lite at 256^2 in float32 compute (bf16 is slow on CPUs)."""
    if mode == "tiny":
        plan = [("tiny C", "tiny_c", 2, 64, "none", False), ("tiny C", "tiny_c", 2, 64, "full", True),
                ("tiny B", "tiny_b", 2, 64, "none", False), ("tiny B", "tiny_b", 2, 64, "none", True)]
    elif mode == "quick":
        plan = TRAIN_TINY + ([v for v in TRAIN_DEFAULT if v[0].startswith("lite")] if train_lite else [])
    else:
        plan = TRAIN_DEFAULT
    return run_train_section(budget, [train_variant(*v, mode=mode, gflops=gflops) for v in plan], peak, gflops)


def train_variant(label, config_name, batch, image_size, remat, cached, *, mode: str, gflops: float) -> dict:
    """A child spec with its parameter counts and time estimates (abstract models only: no weights)."""
    from benchmarks import shared_weights
    from benchmarks.bench_train import variant_config
    from cascade_jax.models.registry import abstract_model
    from cascade_jax.training import get_task

    lite = label.startswith("lite")
    # Lite: float32 compute, and the real-size encoders (there is no tiny encoder of their widths).
    extra = ["compute_dtype=float32", "encoders=lite", "scan_blocks=false"] if lite else []
    cfg = variant_config(config_name, batch=batch, image_size=image_size, remat=remat, cached=cached, extra=extra)
    task = get_task(cfg.stage)
    generator = task.generator_config(cfg)
    frozen = task.frozen_specs(cfg)
    latent = ([-(-image_size // 32)] * 2 + [16]) if cfg.stage == "c" else [image_size // 4, image_size // 4, 4]
    flops = abstract_flops(task.generator_model, generator, batch, tuple(latent)) or 0.0
    step_s = 3 * flops / (gflops * 1e9) * (4 / 3 if remat != "none" else 1.0)
    frozen_params = sum(shared_weights.param_count(abstract_model(*spec)) for spec in frozen.values())
    if not cached and frozen:  # the encoders' forward runs in the step: ~7.5 GFLOP per 256^2 image measured at
        # tiny size (EfficientNet), plus the text encoder's 77 tokens
        step_s += (7.5e9 * (image_size / 256) ** 2 + 2 * 77 * frozen_params) * batch / (gflops * 1e9)
    return dict(label=label, stage=cfg.stage, config=config_name, batch=batch, image_size=image_size, latent=latent,
                remat=remat, cached=cached, steps=2 if mode == "tiny" or lite else 3, overrides=extra,
                random_cache=lite and cached,
                trainable_params=shared_weights.param_count(abstract_model(task.generator_model, generator)),
                frozen_params=frozen_params,
                est_step_s=step_s, est_build_s=300 if lite else 15 if not cached else 45,
                est_compile_s=300 if lite else 30 if cached else 60)


def train_torch(budget, mode: str) -> list[dict]:
    """One update of the small Stage C and Stage B, JAX against PyTorch (bench_train_torch.py)."""
    return run_train_torch_section(budget, rounds={"tiny": 2, "quick": 3, "full": 9}.get(mode, 5))
