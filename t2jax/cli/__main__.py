"""`python -m t2jax.cli`: the `t2jax` command."""

import sys

from t2jax.cli.app import main

sys.exit(main())
