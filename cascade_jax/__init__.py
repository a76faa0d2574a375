"""cascade-jax: Stable Cascade (Wuerstchen v3) in JAX/Flax NNX."""

from cascade_jax.accelerators import skip_absent_tpu

skip_absent_tpu()  # before any backend starts: libtpu without a TPU would print its failed start-up on every run

# The embedded demo is a project on the library: importing it only registers its named weight sets
# ("demo", "demo-lcm") in cascade_jax.named_weights, which the pipelines consult; no core package imports it.
from cascade_jax import demo  # noqa: F401
from cascade_jax.weights.checkpoint import load_model

__all__ = ["load_model"]
