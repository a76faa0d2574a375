"""Train a Stage C LoRA (and new tokens): `python train/train_c_lora.py CONFIG [key=value ...] [--plan TOPOLOGY]`.

CONFIG: configs/training/finetune_c_3b_lora.yaml (official values), finetune_c_1b_lora or tiny_c_lora;
see cascade_jax.training.lora for what trains (only the LoRA factors and token deltas) and the files written.
"""

import sys

import cascade_jax.training.lora  # noqa: F401  (registers the c_lora task)
from cascade_jax.training.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], stage="c_lora"))
