"""Train a Stage C ControlNet: `python train/train_c_controlnet.py CONFIG [key=value ...] [--plan TOPOLOGY [--fit]]`.

CONFIG: configs/training/controlnet_c_3b_{canny,inpainting,sr,identity}.yaml (official values) or
controlnet_tiny; see cascade_jax.training.controlnet for what trains and what is frozen.
"""

import sys

import cascade_jax.training.controlnet  # noqa: F401  (registers the c_controlnet task)
from cascade_jax.training.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], stage="c_controlnet"))
