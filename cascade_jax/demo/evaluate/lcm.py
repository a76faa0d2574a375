"""demo-lcm (the demo's Stage C distilled by the c_lcm task; optionally a Stage B LCM-LoRA of the b_lcm task) against
the demo's default sampling, side by side in one process: per-attribute accuracy on the held-out combinations (the
demo's scorer, cascade_jax.demo.evaluate.accuracy) and wall time per image after compilation.

    python -m cascade_jax.demo.evaluate.lcm                      # 40 held-out combinations x 2 images per setting
    python -m cascade_jax.demo.evaluate.lcm --combos 126 --per-combo 4 [--lcm-b-lora FILE]

Settings: the demo's defaults (20 Stage C + 10 Stage B steps, its sampling.json), the same in 4+2 steps (what the
distillation adds), demo-lcm's (its sampling.json: the LCM sampler without guidance on Stage C) at 4+2, 2+2 and
1+1 steps, at 4+2 and 5+2 with Stage B guided on its first step only (``B_GUIDED_FIRST_STEPS``), and with
``--lcm-b-lora FILE`` demo-lcm with that Stage B LCM-LoRA too (``LCM_B_STEPS``). Each setting first draws one
untimed batch (compiling its sampling loops), then the scored images; the timing comes after, from interleaved
batches of every setting (their median). Writes ``--out`` (JSON) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
from pathlib import Path

from cascade_jax.demo.evaluate import write_text
from cascade_jax.demo.evaluate.accuracy import evaluate_pipeline, sample_split_combos
from cascade_jax.demo import shapes
from cascade_jax.demo.evaluate import RESULTS_DIR

DEFAULT_OUT = RESULTS_DIR / "demo_lcm.json"
LCM_STEPS = ((4, 2), (2, 2), (1, 1))
# demo-lcm with Stage B guided on its first step only (cfg_t_stop 0.5: 3 network passes instead of 4)
B_GUIDED_FIRST_STEPS = ((4, 2), (5, 2))
# With --lcm-b-lora (a Stage B LCM-LoRA, stage b_lcm): Stage B with the LCM sampler, no guidance, from the demo's
# t_start, at these step counts (t_start 1.0 was far worse: pure noise at t = 1 leaves the 1-2 steps too much to do).
LCM_B_STEPS = ((4, 2), (4, 1), (2, 2), (1, 1))
FIELDS = ("steps", "cfg", "cfg_t_start", "cfg_t_stop", "shift", "sampler", "t_start")


def settings(demo_pipe, lcm_pipe, lcm_b_lora=None) -> list:
    """(label, pipeline, prior settings, decoder settings) of every compared setting."""
    rows = [("demo 20+10", demo_pipe, demo_pipe.prior_defaults, demo_pipe.decoder_defaults),
            # the undistilled demo in demo-lcm's default steps: what the distillation adds
            ("demo 4+2 (not distilled)", demo_pipe, demo_pipe.prior_defaults.replace(steps=4),
             demo_pipe.decoder_defaults.replace(steps=2))]
    for prior_steps, decoder_steps in LCM_STEPS:
        rows.append((f"demo-lcm {prior_steps}+{decoder_steps}", lcm_pipe,
                     lcm_pipe.prior_defaults.replace(steps=prior_steps),
                     lcm_pipe.decoder_defaults.replace(steps=decoder_steps)))
    for prior_steps, decoder_steps in B_GUIDED_FIRST_STEPS:
        rows.append((f"demo-lcm {prior_steps}+{decoder_steps}, Stage B guided on its first step", lcm_pipe,
                     lcm_pipe.prior_defaults.replace(steps=prior_steps),
                     lcm_pipe.decoder_defaults.replace(steps=decoder_steps, cfg_t_stop=0.5)))
    if lcm_b_lora is not None:
        both = with_decoder_lora(lcm_pipe, lcm_b_lora)
        decoder = lcm_pipe.decoder_defaults.replace(sampler="lcm", cfg=None)
        for prior_steps, decoder_steps in LCM_B_STEPS:
            rows.append((f"demo-lcm + Stage B LCM-LoRA {prior_steps}+{decoder_steps}", both,
                         lcm_pipe.prior_defaults.replace(steps=prior_steps), decoder.replace(steps=decoder_steps)))
    return rows


def with_decoder_lora(pipe, lora_file):
    """A copy of ``pipe`` whose Stage B has the LoRA file merged in (the rest shared)."""
    from flax import nnx

    from cascade_jax.pipelines.loading import with_loras
    from cascade_jax.pipelines.stage_runner import StageRunner

    stage_b = nnx.merge(pipe.decoder.graphdef, pipe.decoder.state)
    out = copy.copy(pipe)
    out.decoder = StageRunner("Stage B", with_loras(stage_b, [lora_file]), pipe.mesh, pipe.rules)
    return out


def measure(label, pipe, prior, decoder, combos, args) -> dict:
    """Accuracy of one setting on every image (its loops compiled first by an untimed batch)."""
    warm = combos[:1] * args.batch_size
    evaluate_pipeline(pipe, warm[:args.batch_size], 1, 10_000, batch_size=args.batch_size, prior=prior,
                      decoder=decoder)  # compiles this setting's loops: untimed
    result = evaluate_pipeline(pipe, combos, args.per_combo, args.seed, batch_size=args.batch_size, prior=prior,
                               decoder=decoder)
    row = {"label": label, "prior": {f: getattr(prior, f) for f in FIELDS},
           "decoder": {f: getattr(decoder, f) for f in FIELDS}, "n_images": result["n_images"],
           "accuracy": result["accuracy"], "scoring_pass_wall_s": result["wall_s"]}
    print(json.dumps({k: v for k, v in row.items() if k not in ("prior", "decoder")}), flush=True)
    return row


def timed_rounds(rows, combos, args) -> list[list[float]]:
    """Seconds per image of every setting, ``args.timing_rounds`` times, the settings interleaved round by round
    (one full batch each), so a slow minute of a shared machine falls on all of them alike."""
    times = [[] for _ in rows]
    for round_ in range(args.timing_rounds):
        for i, (_, pipe, prior, decoder) in enumerate(rows):
            result = evaluate_pipeline(pipe, combos[:args.batch_size], 1, 20_000 + round_ * args.batch_size,
                                       batch_size=args.batch_size, prior=prior, decoder=decoder)
            times[i].append(result["wall_s"] / args.batch_size)
    return times


def markdown(report: dict) -> str:
    columns = (*shapes.ATTRIBUTES, "exact")
    base = report["rows"][0]["s_per_image"]
    lines = [f"# demo-lcm vs the demo's default sampling ({report['date']})", "",
             f"Held-out combinations: {report['combos']} x {report['per_combo']} image(s), seed {report['seed']}, "
             f"batch {report['batch_size']}, {report['size']}x{report['size']}, backend {report['backend']}.", "",
             "| setting | images | " + " | ".join(columns) + " | s / image | speed-up |",
             "|---" * (len(columns) + 4) + "|"]
    for row in report["rows"]:
        cells = " | ".join(f"{row['accuracy'][c]:.3f}" for c in columns)
        lines.append(f"| {row['label']} | {row['n_images']} | {cells} | {row['s_per_image']:.4f} | "
                     f"{base / row['s_per_image']:.1f}x |")
    lines += ["", f"s / image: the median of {report['timing_rounds']} timed batches of {report['batch_size']} per "
              "setting after compilation, the settings interleaved round by round; end to end: text encoding, "
              "Stage C, Stage B, Stage A decode.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--combos", type=int, default=40, help="held-out combinations (126: all of them)")
    p.add_argument("--per-combo", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-rounds", type=int, default=40, help="interleaved timed batches per setting")
    p.add_argument("--lcm-weights", default="demo-lcm", help="the distilled weights (default: the shipped demo-lcm)")
    p.add_argument("--lcm-b-lora", type=Path, default=None,
                   help="also rows with this Stage B LCM-LoRA (train/train_b_lcm.py demo_lcm_b) merged into Stage B")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if min(args.combos, args.per_combo, args.batch_size, args.timing_rounds) < 1:
        p.error(f"--combos, --per-combo, --batch-size and --timing-rounds must be >= 1, got {args.combos}, "
                f"{args.per_combo}, {args.batch_size}, {args.timing_rounds}")
    import jax

    from cascade_jax.pipelines.cascade import StableCascadePipeline

    demo_pipe = StableCascadePipeline.from_pretrained("demo", dtype="float32")
    lcm_pipe = StableCascadePipeline.from_pretrained(args.lcm_weights, dtype="float32")
    combos = sample_split_combos("heldout", args.combos, args.seed)
    compared = settings(demo_pipe, lcm_pipe, args.lcm_b_lora)
    rows = [measure(*row, combos, args) for row in compared]
    for row, seconds in zip(rows, timed_rounds(compared, combos, args)):
        row.update(s_per_image=statistics.median(seconds), s_per_image_rounds=seconds)
    report = {"combos": len(combos), "per_combo": args.per_combo, "seed": args.seed, "batch_size": args.batch_size,
              "timing_rounds": args.timing_rounds,
              "lcm_b_lora": None if args.lcm_b_lora is None else str(args.lcm_b_lora),
              "size": 128, "backend": jax.default_backend(), "lcm_weights": args.lcm_weights,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "rows": rows}
    write_text(args.out, json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    write_text(args.out.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
