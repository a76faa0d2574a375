"""cascade-jax: Stable Cascade (Wuerstchen v3) in JAX/Flax NNX."""
