"""Which cases each mode of ``run_cpu.py`` runs (default, quick, full, tiny), and in what order.

Order is priority: under a budget the later cases are the ones skipped (with the reason).
"""

from __future__ import annotations

from bench_convert import run_convert_section
from bench_forward import STAGE_SHAPES, abstract_flops, run_forward_section
from bench_pipeline import run_pipeline_section
from bench_train import SMALL_STAGE_C, run_train_section

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


def train(budget, mode: str, gflops: float, peak: dict, train_lite: bool) -> list[dict]:
    import bridge
    from cascade_jax.models.registry import abstract_model

    shape = [24, 24, 16]
    configs = {"tiny": _tiny("stage_c")[1], "small (~50M)": SMALL_STAGE_C, "lite (1B)": _preset("stage_c_lite")[1]}
    batches = {"tiny": 4, "small (~50M)": 2, "lite (1B)": 1}
    if mode == "tiny":
        plan = [("tiny", "none"), ("tiny", "blocks")]
    elif mode == "quick":
        plan = [("tiny", "none"), ("small (~50M)", "none")]
    elif mode == "full":
        plan = [(c, r) for c in configs for r in ("none", "whole", "blocks")]
    else:
        plan = [("tiny", "none"), ("small (~50M)", "none"), ("small (~50M)", "blocks"), ("small (~50M)", "whole"),
                ("lite (1B)", "blocks")]
    variants = []
    for label, remat in plan:
        config, batch = configs[label], batches[label]
        n_params = bridge.param_count(abstract_model("stage_c", config))
        flops = abstract_flops("stage_c", config, batch, tuple(shape))
        spec = dict(label=label, config=config, batch=batch, shape=shape, remat=remat, n_params=n_params,
                    steps=2 if mode == "tiny" else 3, est_step_s=3 * (flops or 0) / (gflops * 1e9))
        if label.startswith("lite") and not (train_lite or mode == "full"):
            spec["skip_reason"] = (f"lite Stage C ({n_params / 1e9:.2f}B params) in float32 with AdamW needs "
                                   f"{16 * n_params / 2**30:.1f} GiB for params, grads and optimizer state before "
                                   "activations: too much for a shared 24 GiB machine; --train-lite tries it")
        variants.append(spec)
    return run_train_section(budget, variants, peak, gflops)
