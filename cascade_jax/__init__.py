"""cascade-jax: Stable Cascade (Wuerstchen v3) in JAX/Flax NNX."""

from cascade_jax.weights.checkpoint import load_model

__all__ = ["load_model"]
