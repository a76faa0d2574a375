"""How often the demo cascade draws what its prompt asks for, on combinations it was trained on and
on the held-out ones it never saw (issue 13).

A fixed, seeded sample of seen (train split) and held-out combinations of the shapes dataset
(``cascade_jax.demo.shapes``) is turned into prompts, ``--per-combo`` images each (consecutive
seeds), generated in fixed-size batches and scored by image analysis (``shapes.score_image``): the
fraction right per attribute (colour, shape, position, background) and for all four at once.

    python -m cascade_jax.demo.evaluate.accuracy                       # the shipped demo weights
    python -m cascade_jax.demo.evaluate.accuracy --weights DIR --combos 126 --per-combo 4
    python -m cascade_jax.demo.evaluate.accuracy --random tiny --combos 4 --per-combo 1   # plumbing check

Writes ``--out`` (JSON: settings, per-split accuracy, per-image predictions) and a markdown table
beside it (same name, ``.md``), each atomically. Random weights give chance-level accuracy or worse.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

from cascade_jax.demo.evaluate import write_text
from cascade_jax.demo import shapes
from cascade_jax.demo.evaluate import RESULTS_DIR

DEFAULT_OUT = RESULTS_DIR / "demo_accuracy.json"
SPLIT_LABELS = {"train": "seen", "heldout": "held-out"}
COLUMNS = (*shapes.ATTRIBUTES, "exact")


def sample_split_combos(split: str, count: int, seed: int) -> list:
    """``count`` distinct combinations of ``split`` (all of them if it has fewer), seeded, in ALL_COMBOS order."""
    pool = shapes.combos_of(split)
    if count < 1:
        raise ValueError(f"--combos must be at least 1, got {count}")
    rng = np.random.default_rng([seed, shapes.SPLITS.index(split)])
    picked = rng.choice(len(pool), min(count, len(pool)), replace=False)
    return [pool[i] for i in sorted(picked)]


def _batches(items: list, batch_size: int):
    """Fixed-size batches (the last padded with copies of its last item) so one compiled program serves
    every batch; yields (batch, number of real items)."""
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        yield chunk + [chunk[-1]] * (batch_size - len(chunk)), len(chunk)


def evaluate_pipeline(pipe, combos, per_combo: int, seed: int, *, size: int = 128, batch_size: int = 16,
                      prior=None, decoder=None, keep_images: bool = False) -> dict:
    """Generate ``per_combo`` images of each combination's caption and score them.

    Image ``j`` of combination ``k`` uses seed ``seed + k * per_combo + j``, whatever the batch size.
    ``prior`` / ``decoder``: SamplerSettings for the two stages (None: the pipeline's defaults).
    Returns n_images, accuracy (attribute -> fraction, plus "exact"), wall_s (all batches),
    first_batch_s (includes compiling the sampling loops), images_per_s after the first batch, and
    one record per image (caption, seed, prediction); ``images`` (uint8 array) if ``keep_images``.
    """
    combos = list(combos)
    if per_combo < 1 or batch_size < 1 or not combos:
        raise ValueError(f"need per_combo >= 1 (got {per_combo}), batch_size >= 1 (got {batch_size}) "
                         f"and at least one combination (got {len(combos)})")
    items = [(combo, seed + k * per_combo + j) for k, combo in enumerate(combos) for j in range(per_combo)]
    stages = {name: value for name, value in (("prior", prior), ("decoder", decoder)) if value is not None}
    images, batch_times = [], []
    for batch, real in _batches(items, batch_size):
        start = time.perf_counter()
        out = pipe.text_to_image([shapes.caption(c) for c, _ in batch], height=size, width=size,
                                 seed=[s for _, s in batch], **stages)
        batch_times.append(time.perf_counter() - start)
        images.extend(np.asarray(out.images[:real]))
    predictions = [shapes.score_image(image) for image in images]
    targets = [c for c, _ in items]
    result = {
        "combos": len(combos), "per_combo": per_combo, "n_images": len(items),
        "accuracy": shapes.accuracy(images, targets),
        "wall_s": sum(batch_times), "first_batch_s": batch_times[0],
        "images_per_s": (len(items) - batch_size) / sum(batch_times[1:]) if len(batch_times) > 1 else None,
        "records": [{"caption": shapes.caption(c), "seed": s, "prediction": p._asdict()}
                    for (c, s), p in zip(items, predictions)],
    }
    if keep_images:
        result["images"] = np.stack(images)
    return result


def evaluate_splits(pipe, n_combos: int, per_combo: int, seed: int, **kw) -> dict:
    """evaluate_pipeline on a seeded sample of seen and of held-out combinations (seen first: it pays
    the compilation, see first_batch_s). Held-out seeds continue after the seen ones."""
    results, next_seed = {}, seed
    for split in shapes.SPLITS:
        combos = sample_split_combos(split, n_combos, seed)
        results[SPLIT_LABELS[split]] = evaluate_pipeline(pipe, combos, per_combo, next_seed, **kw)
        next_seed += len(combos) * per_combo
    return results


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def markdown(report: dict) -> str:
    lines = [f"# Demo accuracy: {report['weights']}", "",
             f"{report['date']}; {report['size']}x{report['size']}, {report['per_combo']} image(s) per combination, "
             f"seed {report['seed']}, batch {report['batch_size']}, backend {report['backend']}; "
             f"prior {_settings_text(report['prior'])}, decoder {_settings_text(report['decoder'])}.", "",
             "| split | combinations | images | " + " | ".join(COLUMNS) + " | wall s |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for label, split in report["splits"].items():
        cells = " | ".join(f"{split['accuracy'][c]:.3f}" for c in COLUMNS)
        lines.append(f"| {label} | {split['combos']} | {split['n_images']} | {cells} | {split['wall_s']:.1f} |")
    first = report["splits"]["seen"]["first_batch_s"]
    lines += ["", f"The first seen batch ({first:.1f} s) includes compiling the sampling loops. Scores are by "
              "image analysis (cascade_jax.demo.shapes.score_image); chance is 1/8 colour and background, "
              "1/3 shape, 1/5 position.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--weights", default=None, help="'demo' (default) or a weights folder for from_pretrained")
    source.add_argument("--random", metavar="SET", help="random weights of a pipeline set (tiny): a plumbing check")
    p.add_argument("--per-combo", type=int, default=2, help="images per combination (default 2)")
    p.add_argument("--combos", type=int, default=40, help="combinations per split (default 40; 126 = every held-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image side (default 128, the demo's size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    for stage in ("prior", "decoder"):  # unset: the weights' defaults (their sampling.json, else official)
        p.add_argument(f"--{stage}-steps", type=int, default=None, help=f"{stage} sampling steps")
        p.add_argument(f"--{stage}-cfg", type=float, default=None, help=f"{stage} guidance scale")
        p.add_argument(f"--{stage}-t-start", type=float, default=None, help=f"{stage} first step's t")
    p.add_argument("--official", action="store_true",
                   help="start from the official settings, not the weights' sampling.json")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT}); .md beside it")
    return p


def stage_settings(args, pipe) -> dict:
    """Each stage's SamplerSettings: the pipeline's defaults (or the official ones with --official) with the flags."""
    from cascade_jax.pipelines.defaults import OFFICIAL

    out = {}
    for name in ("prior", "decoder"):
        base = OFFICIAL[name] if args.official else getattr(pipe, f"{name}_defaults")
        changes = {k: getattr(args, f"{name}_{k}") for k in ("steps", "cfg", "t_start")
                   if getattr(args, f"{name}_{k}") is not None}
        try:
            out[name] = base.replace(**changes)
        except ValueError as e:
            raise ValueError(f"--{name}-{e}") from None
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    from cascade_jax.pipelines.cascade import StableCascadePipeline

    weights = args.weights or "demo"
    try:
        if min(args.per_combo, args.batch_size, args.combos) < 1:
            raise ValueError(f"--combos ({args.combos}), --per-combo ({args.per_combo}) and --batch-size "
                             f"({args.batch_size}) must be >= 1")
        start = time.perf_counter()
        if args.random:
            pipe = StableCascadePipeline.random(args.random, dtype=args.dtype)
        else:
            pipe = StableCascadePipeline.from_pretrained(weights, dtype=args.dtype)
        load_s = time.perf_counter() - start
        stages = stage_settings(args, pipe)
        print(f"pipeline ready in {load_s:.1f}s; scoring {args.combos} seen and held-out combinations "
              f"x {args.per_combo} image(s)", flush=True)
        splits = evaluate_splits(pipe, args.combos, args.per_combo, args.seed, size=args.size,
                                 batch_size=args.batch_size, **stages)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fields = ("steps", "cfg", "shift", "sampler", "t_start")
    report = {"weights": f"random:{args.random}" if args.random else weights, "size": args.size,
              "per_combo": args.per_combo, "seed": args.seed, "batch_size": args.batch_size, "dtype": args.dtype,
              "prior": {f: getattr(stages["prior"], f) for f in fields},
              "decoder": {f: getattr(stages["decoder"], f) for f in fields},
              "backend": jax.default_backend(), "load_s": load_s,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "splits": splits}
    write_text(args.out, json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    write_text(args.out.with_suffix(".md"), table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
