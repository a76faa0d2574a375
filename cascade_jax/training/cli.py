"""What ``train/train_c.py`` and ``train/train_b.py`` run: parse, (multi-host init), train or plan, export."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax


def parse_args(argv, stage: str):
    parser = argparse.ArgumentParser(description=f"Train Stage {stage.upper()} (cascade-jax).")
    parser.add_argument("config", help="a YAML file or a name in configs/training (e.g. finetune_c_3b, tiny_c)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted for sections: mesh.fsdp=8; "
                                                    "sample_every=500 writes sample collages)")
    parser.add_argument("--dry-run", "--plan", action="store_true", dest="dry_run",
                        help="compile the step for the configured mesh from shapes only; print memory and FLOPs")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (multi-host; automatic on TPU pods/SLURM)")
    parser.add_argument("--export", default=None, help="weights folder written at the end: the trained model (+EMA) "
                        "and the frozen models and tokenizer it trained with, for generate.py --weights (default: "
                        "output_path/experiment_id/export; refused before training if it holds anything but this "
                        "run's earlier export)")
    return parser.parse_args(argv)


def main(argv, stage: str) -> int:
    from cascade_jax.training.interrupt import exit_status

    return exit_status(lambda: _main(parse_args(argv, stage), stage))


def config_line(args) -> str:
    """The start-up line naming the config (file or shipped name) and the overrides given."""
    from cascade_jax.training.config import training_configs_dir

    path = args.config if os.path.isfile(args.config) else training_configs_dir() / f"{args.config}.yaml"
    overrides = f"; overrides: {' '.join(args.overrides)}" if args.overrides else ""
    return f"config: {args.config} ({path}){overrides}"


def _main(args, stage: str) -> int:
    if args.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    from cascade_jax.training import export_run, load_config, train
    from cascade_jax.training.console import say
    from cascade_jax.training.export import check_export_folder
    from cascade_jax.training.plan import plan

    cfg = load_config(args.config, [f"stage={stage}", *args.overrides])
    if args.dry_run:
        print(json.dumps(plan(cfg), indent=1))
        return 0
    say(config_line(args))
    out = args.export or os.path.join(cfg.output_path, cfg.experiment_id, "export")
    try:  # before any compile: an export never overwrites a user's file
        check_export_folder(out, cfg)
    except (OSError, ValueError) as e:
        print(f"error: --export: {e}", file=sys.stderr)
        return 2
    run = train(cfg, export_dir=out)
    if jax.process_index() == 0:
        exported = export_run(run, out)
        report = {"export": str(Path(out).resolve()), **{k: [str(p) for p in v] for k, v in exported.items()}}
        if cfg.sample_every:  # the collages of training/samples.py
            report["samples"] = [os.path.join(cfg.output_path, cfg.experiment_id, "samples")]
        print(json.dumps(report, indent=1))
    return 0
