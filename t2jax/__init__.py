"""t2jax: Transformer² (self-adaptive LLMs with SVF experts) in JAX."""

__version__ = "0.1.0"
