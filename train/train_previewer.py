"""Train the Previewer: `python train/train_previewer.py CONFIG [key=value ...] [--dry-run]`
(see cascade_jax.training)."""

import sys

from cascade_jax.training.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], stage="previewer"))
