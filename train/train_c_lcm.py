"""Distil Stage C for few-step sampling: `python train/train_c_lcm.py CONFIG [key=value ...] [--plan TOPOLOGY [--fit]]`.

CONFIG: configs/training/lcm_c_3b.yaml (full student), lcm_c_3b_lora.yaml (an LCM-LoRA) or demo_lcm.yaml;
see cascade_jax.training.lcm for what trains and what is written.
"""

import sys

import cascade_jax.training.lcm  # noqa: F401  (registers the c_lcm task)
from cascade_jax.training.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], stage="c_lcm"))
