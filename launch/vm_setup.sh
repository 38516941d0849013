#!/usr/bin/env bash
# Idempotent worker setup: a virtual environment with t2jax installed for TPUs.
#   bash launch/vm_setup.sh [REPO_DIR]   (REPO_DIR defaults to the checkout holding this script)
# Set T2JAX_EXTRA=cuda on a GPU VM, or T2JAX_EXTRA= for CPU only.
set -euo pipefail

repo="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
venv="${T2JAX_VENV:-$HOME/t2jax-venv}"
extra="${T2JAX_EXTRA-tpu}"

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -e "$repo${extra:+[$extra]}"
"$venv/bin/python" - <<'PY'
import jax

print(f"jax {jax.__version__}: {jax.local_device_count()} local devices "
      f"({jax.local_devices()[0].device_kind}) on backend {jax.default_backend()}")
PY
