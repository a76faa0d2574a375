from setuptools import find_packages, setup

setup(
    name="cascade-jax",
    version="0.1.0",
    description="Stable Cascade (Wuerstchen v3) in JAX/Flax NNX: models, weight conversion, parity tests",
    python_requires=">=3.10",
    packages=find_packages(include=["cascade_jax", "cascade_jax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "pillow",
        "safetensors",
        "pyyaml",
        "regex",
        "transformers",
    ],
    extras_require={
        # PyTorch references: only for parity tests, verification and reading .pt files.
        "test": [
            "pytest",
            "torch==2.14.1",
            "torchvision==0.29.1",
            "diffusers==0.42.1",
            # Only its bundled CLIP BPE merges file is used, to build tokenizer folders in tests.
            "open_clip_torch==3.3.0",
            "opencv-python-headless",  # the canny hint test (same as the `controlnet` extra)
            # The data-loader tests (same as the `train` extra).
            "grain>=0.2.18",
            "tensorflow-datasets>=4.9.10",
            "tensorboardX>=2.6",
            "tqdm",
        ],
        "convert": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "diffusers==0.42.1",
        ],
        # Training input pipeline (cascade_jax/data/loader.py); TFDS reads ArrayRecord without TensorFlow.
        "train": [
            "grain>=0.2.18",
            "tensorflow-datasets>=4.9.10",
            "tensorboardX>=2.6",
            "tqdm",
        ],
        # ControlNet hint filters: the canny hint calls cv2.Canny as the official filter does.
        "controlnet": ["opencv-python-headless"],
    },
)
