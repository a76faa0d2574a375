"""Train Stage A (the VQ autoencoder): `python train/train_a.py CONFIG [key=value ...] [--dry-run]`
(see cascade_jax.training)."""

import sys

from cascade_jax.training.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], stage="a"))
