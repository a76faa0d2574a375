"""Distil Stage B for few-step decoding: `python train/train_b_lcm.py CONFIG [key=value ...] [--plan TOPOLOGY [--fit]]`.

CONFIG: configs/training/lcm_b_3b_lora.yaml (an LCM-LoRA of the released Stage B) or demo_lcm_b.yaml;
see cascade_jax.training.lcm_b for what trains and what is written.
"""

import sys

import cascade_jax.training.lcm_b  # noqa: F401  (registers the b_lcm task)
from cascade_jax.training.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], stage="b_lcm"))
