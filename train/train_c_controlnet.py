"""Train a Stage C ControlNet: `python train/train_c_controlnet.py CONFIG [key=value ...]`.

CONFIG: configs/training/controlnet_c_3b_{canny,inpainting,sr,identity}.yaml (official values) or
controlnet_tiny; see cascade_jax.training.controlnet for what trains and what is frozen.
"""

import sys

import cascade_jax.training.controlnet  # noqa: F401  (registers the c_controlnet task)
from cascade_jax.training.cli import main

if __name__ == "__main__":
    if {"--dry-run", "--plan"} & set(sys.argv[1:]):
        # The planner builds the trained model as the U-Net it compiles for; a ControlNet task needs its own.
        sys.exit("--dry-run is not supported for ControlNet training yet (cascade_jax.training.plan builds only "
                 "U-Net generators); run a few updates of a small config instead")
    sys.exit(main(sys.argv[1:], stage="c_controlnet"))
