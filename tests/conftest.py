"""Test setup: CPU only, 8 fake devices, benchmark data from ../shared/data unless told."""

import os
import pathlib

# Must run before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("T2JAX_DATA", str(REPO_ROOT.parent / "shared" / "data"))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
