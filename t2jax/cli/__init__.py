"""The `t2jax` command line: one module per command group."""
