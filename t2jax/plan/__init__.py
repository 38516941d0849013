"""Ahead-of-time planning for TPUs and GPUs (`t2jax plan`)."""
