"""cascade-jax: Stable Cascade (Wuerstchen v3) in JAX/Flax NNX."""

# The embedded demo is a project on the library: importing it only registers its named weight sets
# ("demo", "demo-lcm") in cascade_jax.named_weights, which the pipelines consult; no core package imports it.
from cascade_jax import demo  # noqa: F401
from cascade_jax.weights.checkpoint import load_model

__all__ = ["load_model"]
