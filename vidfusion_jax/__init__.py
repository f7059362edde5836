"""vidfusion-jax: multi-modal (infrared + visible) video fusion in JAX/Flax."""

__version__ = "0.1.0"
