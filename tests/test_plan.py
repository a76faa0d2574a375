"""--plan TOPOLOGY: slice names, libtpu's compile-only TPU devices, the planned train step of every trainer, the
--fit search and the sampling plan. TPU compiles run here on the CPU (libtpu, the `tpu` extra); tiny configs,
and the compiles that cost most (EfficientNet's many layers) replaced by tracing where the compile adds nothing.
"""

import json

import jax
import numpy as np
import pytest

import cascade_jax.training.controlnet  # noqa: F401  (registers the c_controlnet task)
import cascade_jax.training.lcm  # noqa: F401  (registers the c_lcm task)
import cascade_jax.training.lcm_b  # noqa: F401  (registers the b_lcm task)
import cascade_jax.training.lora  # noqa: F401  (registers the c_lora task)
from cascade_jax.accelerators import parse_target, peak_flops_for, resolve_target, topology_shape
from cascade_jax.training import load_config
from cascade_jax.training.plan import plan_mesh, traced_step

pytest.importorskip("libtpu", reason="planning for TPU slices needs the tpu extra (libtpu)")


@pytest.mark.parametrize("name, expected", [
    ("v5p-16", ("v5p", "2x2x2")), ("v5p-128", ("v5p", "4x4x4")), ("v4-8", ("v4", "2x2x1")), ("v4-32", ("v4", "2x2x4")),
    ("v5e-16", ("v5e", "4x4")), ("v5litepod-4", ("v5e", "2x2")), ("v6e-8", ("v6e", "2x4")), ("v6e-256", ("v6e", "16x16")),
    ("v5e-1", ("v5e", "1x1")), ("v5e:2x2", ("v5e", "2x2")), ("V5P:2x2x4", ("v5p", "2x2x4"))])
def test_slice_names_as_rented(name, expected):
    """v4/v5p names count TensorCores (two per chip), v5e/v6e names count chips; topologies pass through."""
    assert parse_target(name) == expected


@pytest.mark.parametrize("name, message", [("v5p-15", "two per chip"), ("v7-8", "unknown TPU generation"),
                                           ("v5e:2x2x2", "2 sides"), ("v5e-12", "powers of two"),
                                           ("h100", "not a TPU slice")])
def test_bad_slice_names_say_what_to_give(name, message):
    with pytest.raises(ValueError, match=message):
        parse_target(name)


def test_slice_shapes_follow_google_cloud():
    assert [topology_shape(n, 3) for n in (4, 8, 16, 32, 64, 128, 256, 512)] == [
        (2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8)]
    assert [topology_shape(n, 2) for n in (1, 4, 8, 16, 32, 64, 256)] == [
        (1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (16, 16)]


def test_topologies_open_without_a_tpu_and_the_suite_stays_on_the_cpu():
    v4, v5p, v5e = resolve_target("v4-8"), resolve_target("v5p-16"), resolve_target("v5e-1")
    assert (v4.device_count, v4.device_kind, v4.hbm_gib) == (4, "TPU v4", 32)  # megacore: one device per chip
    assert (v5p.device_count, v5p.topology, v5p.hbm_gib) == (8, "v5p:2x2x2", 95)
    assert (v5e.device_count, v5e.devices[0].device_kind) == (1, "TPU v5 lite")
    assert jax.default_backend() == "cpu"
    assert peak_flops_for("TPU v5") == 459e12 and peak_flops_for("TPU v5 lite") == 197e12


def test_without_a_tpu_the_installed_libtpu_stays_silent():
    """The tpu extra installs libtpu; on a machine without a TPU, importing cascade_jax keeps JAX from trying
    (and noisily failing) to start a TPU backend: the CPU, with nothing from libtpu on stderr."""
    import glob
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("libtpu") is None or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        pytest.skip("needs libtpu installed on a machine without a TPU")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    run = subprocess.run([sys.executable, "-c", "import cascade_jax, jax; print(jax.default_backend())"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "cpu"
    assert "TPU" not in run.stderr and "libtpu" not in run.stderr, run.stderr


def test_train_c_plans_tiny_c_for_a_v5e_4(capsys):
    """The training CLI compiles tiny Stage C's real step for 4 v5e chips and prints the issue's fields."""
    from cascade_jax.training.cli import main

    assert main(["tiny_c", "--plan", "v5e-4", "cached_conditions=true", "batch_size=8"], stage="c") == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["device_kind"] == "TPU v5 lite" and report["devices"] == 4 and report["mesh"]["data"] == 4
    assert report["hbm_gib_per_device"] == 16 and report["fits"] is True and report["margin"] == 0.1
    assert 0 < report["argument_gib_per_device"] <= report["peak_gib_per_device"] < 0.1
    assert report["flops_per_step_per_device"] > 1e5 and report["estimated_step_s"] > 0
    assert report["estimated_mfu"] == pytest.approx(
        report["flops_per_step_per_device"] / report["estimated_step_s"] / 197e12)
    assert report["images_per_s_estimate"] == pytest.approx(8 / report["estimated_step_s"])
    assert report["compile_s"] > 0 and report["host_peak_rss_gib"] > 0
    assert "estimated step s" in out and "(compiler estimate)" in out
    # The compile ran in a child process (training/plan_isolation.py): its own peak RSS is the compile's.
    assert [p["task"] for p in report["processes"]] == ["step"]  # no remat, no scan: nothing else to run
    assert report["processes"][0]["peak_rss_gib"] == report["host_peak_rss_gib"] > 0.1


# The LCM configs plan with scan_blocks (as lcm_c_3b, lcm_c_3b_lora and lcm_b_3b_lora do): two units a level to stack.
SCANNED_C, SCANNED_B = ["scan_blocks=true", "model_config.blocks=[[2],[2]]"], \
    ["scan_blocks=true", "model_config.blocks=[[2,2],[2,2]]"]


@pytest.mark.parametrize("config, overrides", [
    ("tiny_b", ["cached_conditions=true"]), ("tiny_c", ["remat=full"]), ("tiny_c_lora", []),
    ("controlnet_tiny", ["init=scratch"]), ("tiny_a", []), ("tiny_previewer", []),
    ("tiny_c", ["stage=c_lcm", "dropout=false", "lcm={student: lora, solver_steps: 4}", *SCANNED_C]),
    ("tiny_c", ["stage=c_lcm", "dropout=false", "lcm={student: full, solver_steps: 4}", *SCANNED_C]),
    ("tiny_b", ["stage=b_lcm", "dropout=false", "lcm={student: lora, solver_steps: 4}", *SCANNED_B])])
def test_every_trainer_traces_its_planned_step(config, overrides):
    """Each task's abstract models and planned batch are what its loss needs: the step traces on shapes alone
    (the compile is the same call as above)."""
    cfg = load_config(config, overrides)
    traced, trainable = traced_step(cfg, plan_mesh(cfg, resolve_target("v5e-4")))
    assert trainable > 0 and len(traced.jaxpr.eqns) > 0


def test_train_c_lcm_plans_instead_of_training(capsys):
    """train_c_lcm.py's --plan goes to the planner (here a bad slice name, refused before any compile), never to
    training."""
    from cascade_jax.training.cli import main

    assert main(["tiny_c", "--plan", "v5p-15", "dropout=false", "lcm={student: lora, solver_steps: 4}"],
                stage="c_lcm") == 2
    assert "two per chip" in capsys.readouterr().err


def test_fit_finds_the_largest_batch_cheapest_remat_and_says_what_fits(monkeypatch):
    """The search logic on a memory model (no compiles): peak = state/fsdp + images x activation(remat)."""
    from cascade_jax.training import plan_fit

    activation = {None: 4.0, "dots_saveable": 2.0, "dots_with_no_batch_dims_saveable": 1.5, "full": 1.0}
    speed = {None: 1.0, "dots_saveable": 0.9, "dots_with_no_batch_dims_saveable": 0.85, "full": 0.75}

    def fake_plan(cfg, target, margin, with_model_flops=True, **isolation):
        per_chip = cfg.batch_size // (cfg.mesh.data * cfg.mesh.fsdp)
        peak = 40.0 / cfg.mesh.fsdp + per_chip * activation[cfg.remat]
        return {"fits": peak <= 95 * (1 - margin), "peak_gib_per_device": peak, "estimated_step_s": 1.0,
                "images_per_s_estimate": cfg.batch_size * speed[cfg.remat], "compile_s": 0.0}

    monkeypatch.setattr(plan_fit, "plan", fake_plan)
    target = resolve_target("v5p-16")
    report = plan_fit.fit(load_config("tiny_c", ["batch_size=256"]), target)
    # 8 chips: data-only replicates 40 GiB of state; fsdp 8 leaves 80.5 GiB -> 80 images with full remat, the
    # most images per second (80 x 0.75 > 40 x 1.0 without remat).
    assert report["winner"]["mesh"] == {"data": 1, "fsdp": 8} and report["winner"]["batch_per_chip"] == 80
    assert report["winner"]["remat"] == "full"
    assert report["request"] == {"batch_size": 256, "fits": True,
                                 "with": {"remat": "dots_saveable", "mesh": {"data": 1, "fsdp": 8}}}
    small = plan_fit.fit(load_config("tiny_c", ["batch_size=1024"]), target)
    assert small["request"]["fits"] is False and small["request"]["largest_that_fits"] == 640
    assert "does not fit; the largest that fits: batch_size=640" in plan_fit.format_fit(small)


def test_a_failed_child_leaves_the_step_plan_and_says_why(monkeypatch):
    """plan() keeps the step's numbers when a later piece fails: the FLOPs trace raising (here, in this process)
    and the time estimate's compile killed in its child (a real child, SIGKILL as the kernel's OOM killer
    sends): each missing number is None with the reason in the report, and the second estimate compile is not
    tried. (The step's numbers are given: what is tested is what plan() does with the pieces' outcomes.)"""
    import signal

    from cascade_jax.training import plan as planning
    from cascade_jax.training.plan_isolation import in_process, run_in_child

    numbers = {"memory": {"argument": 1.0, "temp": 2.0, "peak": 3.5}, "cost": {"flops": 2e9, "optimal_seconds": None},
               "compile_s": 1.0, "hardware_flops": 8e9, "trainable_params": 10, "mesh": {"data": 4, "fsdp": 1, "tensor": 1},
               "devices": 4, "device_kind": "TPU v5 lite", "host_peak_rss_gib": 1.0}
    ran = []

    def out_of_memory():
        raise MemoryError("no room for the trace")

    def run(self, task, piece, *args):
        ran.append(task)
        if piece is planning.step_numbers:
            return in_process(task, lambda: numbers)
        if piece is planning.model_step_flops:
            return in_process(task, out_of_memory)
        return run_in_child(task, "signal:raise_signal", signal.SIGKILL)

    monkeypatch.setattr(planning.Pieces, "run", run)
    report = planning.plan(load_config("tiny_c", ["remat=full", "scan_blocks=true"]), "v5e-4")
    assert ran == ["step", "FLOPs without remat (traced)", "time estimate: shallow step x1"]
    assert report["peak_gib_per_device"] == 3.5 and report["fits"] is True and report["devices"] == 4
    assert report["model_flops_error"] == "FLOPs without remat (traced): MemoryError: no room for the trace"
    assert report["flops_per_step_per_device"] is None and report["estimated_mfu"] is None
    assert report["estimated_step_s"] is None and report["estimate_points"] == []
    assert report["estimate_source"].startswith("none: a compile of the time estimate failed (time estimate: "
                                                "shallow step x1: killed by SIGKILL")
    assert "killed by SIGKILL" in planning.format_table(report)


def test_a_child_above_its_memory_limit_is_stopped_and_says_so():
    """--plan-memory-gib: the child (here at most sleeping after its imports, which alone pass 0.1 GiB) is
    stopped at the limit, not left to the kernel, and the outcome names the limit."""
    from cascade_jax.training.plan_isolation import ChildDiedError, run_in_child

    outcome = run_in_child("sleeper", "time:sleep", 60, memory_limit_gib=0.1)
    assert outcome.value is None and outcome.wall_s < 30
    assert outcome.error.startswith("stopped at the host-memory limit (0.1 GiB)") and outcome.peak_rss_gib >= 0.1
    with pytest.raises(ChildDiedError, match="sleeper: stopped at the host-memory limit"):
        outcome.result()


def test_sampling_plan_says_whether_the_cascade_fits_one_chip():
    """generate.py --plan's library call: tiny cascade, 64x64, on one v5e chip: every stage compiled."""
    from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS
    from cascade_jax.pipelines.loading import pipeline_set
    from cascade_jax.pipelines.plan import format_sampling, plan_sampling

    report = plan_sampling(pipeline_set("tiny"), resolve_target("v5e-1"), height=64, width=64, batch=2,
                           dtype="float32", prior=PRIOR_DEFAULTS.replace(steps=1), decoder=DECODER_DEFAULTS.replace(steps=1))
    assert report["fits"] is True and report["devices"] == 1 and report["verdict"] == "fits one chip"
    assert [s["stage"] for s in report["stages"]] == ["Stage C", "Stage B", "Stage A decode"]
    assert all(s["estimated_s"] > 0 for s in report["stages"]) and report["estimated_s_per_image"] > 0
    assert report["stages"][0]["cfg_batch"] == 4
    assert np.isclose(report["estimated_s_per_image"], sum(s["estimated_s"] for s in report["stages"]) / 2)
    assert "fits one chip" in format_sampling(report)


def test_the_unrolled_step_has_no_loop_so_the_compiler_can_estimate_it():
    """plan_estimate reads the TPU compiler's estimate of an unrolled step, which it gives only without while
    loops; the adaptive loss weight's bucket lookup (jnp.searchsorted's default binary search) was one. Lowered
    for TPU devices: for the CPU, JAX writes its random bits' hash as a loop."""
    cfg = load_config("tiny_c", ["cached_conditions=true", "scan_blocks=true", "adaptive_loss_weight=true",
                                 "mesh.data=1", "mesh.fsdp=4"])
    traced, _ = traced_step(cfg, plan_mesh(cfg, resolve_target("v5e-4")), unrolled=True)
    assert "stablehlo.while" not in traced.lower().as_text()


def test_the_compilers_own_loops_keep_its_estimate_and_the_programs_loops_do_not():
    """compile_report.xla_cost: a while loop in the program as written (StableHLO) leaves its body out of the TPU
    cost model, so there is no estimate; loops the compiler adds (FSDP all-gathers windowed into matmuls) are
    costed, so with the lowered text given they do not remove it. ConcatBitcast's -1 s each are added back."""
    from cascade_jax import compile_report

    class Compiled:
        def __init__(self, text):
            self.text = text

        def cost_analysis(self):
            return {"optimal_seconds": 0.5 - 2, "flops": 1e9}

        def as_text(self):
            return self.text

    hlo = ('%while.1 = (u32[]) while(%t), condition=%c, body=%b\n'
           + ' custom-call(), custom_call_target="ConcatBitcast"\n' * 2)
    assert compile_report.xla_cost(Compiled(hlo))["optimal_seconds"] is None  # judged by the compiled text
    assert compile_report.xla_cost(Compiled(hlo), lowered_text="stablehlo.add")["optimal_seconds"] == 0.5
    assert compile_report.xla_cost(Compiled(hlo), lowered_text="%0 = stablehlo.while(")["optimal_seconds"] is None
