"""What every ``train/train_*.py`` runs: parse, (multi-host init), train or plan (``--plan TOPOLOGY [--fit]``), and
write what the task makes: an export folder (``--export``) and the task's own outputs (a LoRA file), as hooks of
the run (``Task.exports``, ``Task.output_hooks``), each summarised at the end."""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax


def parse_args(argv, stage: str):
    parser = argparse.ArgumentParser(description=f"Train {stage_title(stage)} (cascade-jax).")
    parser.add_argument("config", help="a YAML file or a name in configs/training (e.g. finetune_c_3b, tiny_c)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted for sections: mesh.fsdp=8; "
                                                    "sample_every=500 writes sample collages)")
    parser.add_argument("--plan", nargs="?", const="", default=None, metavar="TOPOLOGY",
                        help="compile the step from shapes only (no weights, no data) for a TPU slice (v5p-16, v4-8, "
                             "v5e-16, v6e-8, v5e:2x2 ...; needs the tpu extra) or cpu-N simulated devices, and "
                             "print per-chip memory, whether it fits, FLOPs and the compiler's step-time estimate; "
                             "without TOPOLOGY: this machine's devices")
    parser.add_argument("--dry-run", action="store_const", const="", dest="plan", help="--plan without TOPOLOGY")
    parser.add_argument("--fit", action="store_true",
                        help="with --plan: search the largest batch per chip, cheapest remat and mesh that fit")
    parser.add_argument("--margin", type=float, default=None,
                        help="with --plan: share of each chip's HBM to keep free (default 0.1)")
    parser.add_argument("--plan-memory-gib", type=float, default=None, metavar="GIB",
                        help="with --plan: stop any one compile (each runs in its own process) above this much host "
                             "memory; the plan then says which number is missing and why (default: no limit; Linux)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (multi-host; automatic on TPU pods/SLURM)")
    parser.add_argument("--export", default=None, help="weights folder written at the end: the trained model (+EMA) "
                        "and the frozen models and tokenizer it trained with, for generate.py --weights (default: "
                        "output_path/experiment_id/export; refused before training if it holds anything but this "
                        "run's earlier export)")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume a checkpoint trained with another model, task, batch or data (refused otherwise)")
    return parser.parse_intermixed_args(argv)  # overrides may follow the flags


def stage_title(stage: str) -> str:
    """``c`` -> "Stage C", ``c_lora`` -> "Stage C (c_lora)", ``previewer`` -> "the Previewer"."""
    if stage == "previewer":
        return "the Previewer"
    base = stage.split("_", 1)[0]
    return f"Stage {base.upper()}" + (f" ({stage})" if "_" in stage else "")


def run_plan(cfg, args) -> int:
    """``--plan [TOPOLOGY] [--fit]``: print the plan (JSON, then a short table); 1 when it does not fit."""
    from cascade_jax.accelerators import plan_target
    from cascade_jax.training.plan import DEFAULT_MARGIN, format_table, plan
    from cascade_jax.training.plan_isolation import ChildDiedError

    try:
        target = plan_target(args.plan)
    except (ValueError, RuntimeError) as err:  # an unknown slice name, or no libtpu
        print(f"error: {err}", file=sys.stderr)
        return 2
    margin = DEFAULT_MARGIN if args.margin is None else args.margin
    isolation = {"isolate": True, "child_memory_gib": args.plan_memory_gib}  # each compile in its own process
    try:
        if args.fit:
            from cascade_jax.training.plan_fit import fit, format_fit

            report = fit(cfg, target, margin=margin, **isolation)
            text = format_fit(report)
        else:
            report = plan(cfg, target, margin=margin, **isolation)
            text = format_table(report)
    except ChildDiedError as err:  # the step's own compile: without it there is no plan
        print(f"error: the step's compile did not finish: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1))
    print(text)
    return 0 if (report.get("fits") is not False) else 1


def main(argv, stage: str) -> int:
    from cascade_jax.training.interrupt import exit_status

    args = parse_args(argv, stage)
    return exit_status(lambda: reporting_errors(lambda: _main(args, stage)))


def config_line(args) -> str:
    """The start-up line naming the config (file or shipped name) and the overrides given."""
    from cascade_jax.training.config import training_configs_dir

    path = args.config if os.path.isfile(args.config) else training_configs_dir() / f"{args.config}.yaml"
    overrides = f"; overrides: {' '.join(args.overrides)}" if args.overrides else ""
    return f"config: {args.config} ({path}){overrides}"


def reporting_errors(body) -> int:
    """``body()``, with the trainer's own refusals and stops as one ``error:`` line (no traceback): exit 2 for a
    config or run folder that cannot train, 1 for a run stopped on the way (NaN loss, full disk)."""
    from cascade_jax.training.finite_guard import NonFiniteError
    from cascade_jax.training.resume_check import ResumeError
    from cascade_jax.training.run_lock import RunLockedError
    from cascade_jax.training.storage_errors import DiskFullError
    from cascade_jax.training.validation import ConfigError
    from cascade_jax.weights.checkpoint import CheckpointError
    from cascade_jax.weights.convert import ConversionError

    try:
        return body()
    except (NonFiniteError, DiskFullError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, ResumeError, RunLockedError, ConversionError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def load_checked(args, stage: str, task=None):
    """The config (values checked at load) and, when the task exports, the export folder; ``train`` checks
    the rest against the task and the files before it reads data or builds a model."""
    from cascade_jax.training import get_task, load_config
    from cascade_jax.training.run_checks import check_export_folder
    from cascade_jax.training.validation import ConfigError

    task = task or get_task(stage)
    try:
        cfg = load_config(args.config, [f"stage={stage}", *args.overrides])
        exports = task.exports(cfg)
    except (ValueError, TypeError) as err:  # the config file and overrides: each message names the key
        raise ConfigError(str(err)) from None
    if exports and args.plan is None:  # a plan compiles from shapes: it writes nothing
        check_export_folder(export_folder(args, cfg), cfg)
    return cfg


def export_folder(args, cfg) -> str:
    return args.export or os.path.join(cfg.output_path, cfg.experiment_id, "export")


def output_hooks(task, cfg, args) -> list:
    """The hooks that write the run's products: the task's own (a LoRA file) and the export folder."""
    from cascade_jax.training.export import ExportHook

    hooks = list(task.output_hooks(cfg))
    if task.exports(cfg):
        hooks.append(ExportHook(export_folder(args, cfg)))
    return hooks


def _main(args, stage: str) -> int:
    if args.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    from cascade_jax.training import get_task, train
    from cascade_jax.training.console import say

    task = get_task(stage)
    cfg = load_checked(args, stage, task)
    if args.plan is not None:
        return run_plan(cfg, args)
    say(config_line(args))
    hooks = output_hooks(task, cfg, args)
    train(cfg, task=task, hooks=hooks, force_resume=args.force_resume)
    for hook in hooks:
        summary = hook.summary()
        if summary is not None:
            print(summary)
    return 0
