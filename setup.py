from importlib import metadata
from pathlib import Path

from setuptools import find_packages, setup


def jax_tpu() -> str:
    """jax[tpu] at the installed jax's version (libtpu must match it exactly); else the tested one."""
    try:
        return f"jax[tpu]=={metadata.version('jax')}"
    except metadata.PackageNotFoundError:
        return "jax[tpu]==0.10.2"


# configs/ stays at the top of the repository (the design card puts it there) and is installed as
# cascade_jax/configs, where cascade_jax.models.registry.configs_root finds it with importlib.resources.
CONFIG_PACKAGES = ["cascade_jax.configs" + "".join("." + part for part in p.relative_to("configs").parts)
                   for p in [Path("configs"), *sorted(q for q in Path("configs").rglob("*") if q.is_dir())]]

setup(
    name="cascade-jax",
    version="0.1.0",
    description="Stable Cascade (Wuerstchen v3) in JAX/Flax NNX: models, weight conversion, parity tests",
    python_requires=">=3.10",
    packages=find_packages(include=["cascade_jax", "cascade_jax.*"]) + CONFIG_PACKAGES,
    package_dir={"cascade_jax.configs": "configs"},
    # The embedded demo cascade (cascade_jax/demo/weights: converted directories and the tokenizer, ~16 MB)
    # ships in the wheel, so `--weights demo` works from any installation; so does demo-lcm (cascade_jax/demo/lcm).
    package_data={**{name: ["*.yaml", "*.yml", "*.json"] for name in CONFIG_PACKAGES},
                  "cascade_jax.demo": ["weights/**/*", "lcm/*"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "ml_dtypes",  # bfloat16 in the safetensors reader
        "pillow",
        "pyyaml",
        "regex",
        "huggingface_hub",  # from_pretrained("org/name") downloads
        "filelock",  # one conversion per cache entry across processes
        "tqdm",  # progress bars of sample/generate.py
    ],
    extras_require={
        # PyTorch references: only for parity tests, verification and reading .pt files.
        "test": [
            "pytest",
            "torch==2.14.1",
            "torchvision==0.29.1",
            "diffusers==0.42.1",
            "transformers==5.24.0",  # CLIP parity references
            "safetensors",
            # Only its bundled CLIP BPE merges file is used, to build tokenizer folders in tests.
            "open_clip_torch==3.3.0",
            "opencv-python-headless", "scipy",  # the hint tests (same as the `controlnet` extra)
            # The data-loader tests (same as the `train` extra).
            "grain>=0.2.18",
            "tensorflow-datasets>=4.9.10",
            "tensorboardX>=2.6",
            "tqdm",
            # The object-storage tests (the `cloud` extra, and real S3 / GCS APIs served on loopback).
            # s3fs's lower bound: without it pip, reconciling aiobotocore's botocore pin with the newest boto3
            # that moto pulls in, backtracks to s3fs 0.4.2 (2020, synchronous, a HEAD before every read).
            "fsspec", "gcsfs", "s3fs>=2024.1", "moto[server]>=5", "gcp-storage-emulator",
            # The app tests (same as the `app` extra); playwright drives Debian's chromium, no browser download.
            "gradio>=6.31,<7", "gradio_client>=2.7,<3", "playwright>=1.65,<2",
            # The planning tests compile for a v5e-4 topology (same as the `tpu` extra).
            jax_tpu(),
        ],
        # sample/app.py, the web app (the library itself never imports gradio).
        "app": ["gradio>=6.31,<7", "gradio_client>=2.7,<3"],
        # convert/verify.py: the PyTorch reference side of a parity check.
        "convert": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "diffusers==0.42.1",
            "safetensors",
        ],
        # Training input pipeline (cascade_jax/data/loader.py); TFDS reads ArrayRecord without TensorFlow.
        "train": [
            "grain>=0.2.18",
            "tensorflow-datasets>=4.9.10",
            "tensorboardX>=2.6",
            "tqdm",
        ],
        # --plan TOPOLOGY: libtpu compiles for TPU slices on any machine (no TPU needed); runtime never needs it.
        "tpu": [jax_tpu()],
        # Paths that are gs://, s3:// or other fsspec URLs (cascade_jax/storage); local paths need none of it.
        "cloud": ["fsspec", "gcsfs", "s3fs>=2024.1"],
        # ControlNet hint filters: the canny hint calls cv2.Canny as the official filter does.
        # scipy: the inpainting masks' Gaussian blur (cascade_jax/data/hints/resize.py).
        "controlnet": ["opencv-python-headless", "scipy"],
    },
)
