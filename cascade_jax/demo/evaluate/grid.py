"""A picture of the demo cascade at work: one row per prompt (seen and held-out combinations), the
prompt written beside its images and the scorer's verdict under each.

    python -m cascade_jax.demo.evaluate.grid [--weights demo|DIR] [--rows 8] [--per-row 4] [--out benchmarks/results/demo_grid.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cascade_jax.demo import shapes
from cascade_jax.demo.evaluate import RESULTS_DIR
from cascade_jax.storage import atomic

SIZE, TEXT_W, VERDICT_H = 128, 330, 14


def verdict(predicted: shapes.Combo, truth: shapes.Combo) -> str:
    return "".join("+" if p == t else "-" for p, t in zip(predicted, truth))  # colour shape position background


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="demo")
    p.add_argument("--rows", type=int, default=8, help="prompts: half seen, half held-out")
    p.add_argument("--per-row", type=int, default=4, help="images (seeds) per prompt")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS_DIR / "demo_grid.png"))
    args = p.parse_args(argv)
    from cascade_jax.pipelines import StableCascadePipeline

    rng = np.random.default_rng(args.seed)
    combos = [(split, shapes.combos_of(split)[i]) for split in shapes.SPLITS
              for i in rng.choice(len(shapes.combos_of(split)), args.rows // 2, replace=False)]
    prompts = [shapes.caption(c) for _, c in combos for _ in range(args.per_row)]
    pipe = StableCascadePipeline.from_pretrained(args.weights, dtype="float32")
    images = pipe.text_to_image(prompts, height=SIZE, width=SIZE, seed=list(range(len(prompts)))).images
    grid = Image.new("RGB", (TEXT_W + args.per_row * SIZE, len(combos) * (SIZE + VERDICT_H)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (split, combo) in enumerate(combos):
        y = row * (SIZE + VERDICT_H)
        words = shapes.caption(combo).split(" in the ")
        draw.multiline_text((6, y + 40), f"[{'held-out' if split == 'heldout' else 'seen'}]\n{words[0]}\nin the {words[1]}",
                            fill="black")
        for j in range(args.per_row):
            image = images[row * args.per_row + j]
            grid.paste(Image.fromarray(image), (TEXT_W + j * SIZE, y))
            draw.text((TEXT_W + j * SIZE + 4, y + SIZE), verdict(shapes.score_image(image), combo), fill="black")
    out = Path(args.out)
    with atomic.replacing(out) as tmp:
        grid.save(tmp, format="PNG")
    print(f"wrote {out} (verdict per image: colour shape position background, + right / - wrong)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
