"""What ``train/train_*.py`` run: parse, (multi-host init), train or plan (``--plan TOPOLOGY [--fit]``), export."""

from __future__ import annotations

import argparse
import json
import os

import jax


def parse_args(argv, stage: str):
    parser = argparse.ArgumentParser(description=f"Train Stage {stage.upper()} (cascade-jax).")
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
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (multi-host; automatic on TPU pods/SLURM)")
    parser.add_argument("--export", default=None, help="folder for the trained generator (+EMA) at the end "
                                                         "(default: output_path/experiment_id/export)")
    return parser.parse_intermixed_args(argv)  # overrides may follow the flags


def run_plan(cfg, args) -> int:
    """``--plan [TOPOLOGY] [--fit]``: print the plan (JSON, then a short table); 1 when it does not fit."""
    from cascade_jax.accelerators import plan_target
    from cascade_jax.training.plan import DEFAULT_MARGIN, format_table, plan

    target = plan_target(args.plan)
    margin = DEFAULT_MARGIN if args.margin is None else args.margin
    if args.fit:
        from cascade_jax.training.plan_fit import fit, format_fit

        report = fit(cfg, target, margin=margin)
        text = format_fit(report)
    else:
        report = plan(cfg, target, margin=margin)
        text = format_table(report)
    print(json.dumps(report, indent=1))
    print(text)
    return 0 if (report.get("fits") is not False) else 1


def main(argv, stage: str) -> int:
    args = parse_args(argv, stage)
    if args.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    from cascade_jax.training import export_run, load_config, train

    cfg = load_config(args.config, [f"stage={stage}", *args.overrides])
    if args.plan is not None:
        return run_plan(cfg, args)
    run = train(cfg)
    out = args.export or os.path.join(cfg.output_path, cfg.experiment_id, "export")
    if jax.process_index() == 0:
        exported = export_run(run, out)
        report = {k: [str(p) for p in v] for k, v in exported.items()}
        if cfg.sample_every:  # the collages of training/samples.py
            report["samples"] = [os.path.join(cfg.output_path, cfg.experiment_id, "samples")]
        print(json.dumps(report, indent=1))
    return 0
