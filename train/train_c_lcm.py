"""Distil Stage C for few-step sampling: `python train/train_c_lcm.py CONFIG [key=value ...]`.

CONFIG: configs/training/lcm_c_3b.yaml (full student), lcm_c_3b_lora.yaml (an LCM-LoRA) or demo_lcm.yaml;
see cascade_jax.training.lcm for what trains and what is written.
"""

import sys

from cascade_jax.training.lcm import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
