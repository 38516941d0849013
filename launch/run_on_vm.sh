#!/usr/bin/env bash
# Runs one t2jax Python script on this worker, logging to LOG_DIR/log.wN (N = the worker number).
#   bash launch/run_on_vm.sh REPO_DIR SCRIPT [ARGS...]
#   e.g. bash launch/run_on_vm.sh ~/t2jax experiments/train_svf.py --config=...
# T2JAX_DISTRIBUTED=1 makes `t2jax.parallel.maybe_initialize_distributed` call
# jax.distributed.initialize(), which finds the other workers of a TPU slice by itself.
set -euo pipefail

repo="$1"
shift
venv="${T2JAX_VENV:-$HOME/t2jax-venv}"
log_dir="${LOG_DIR:-$HOME/t2jax-logs}"
mkdir -p "$log_dir"
log_dir="$(cd "$log_dir" && pwd)"  # absolute: the script changes directory below

# The worker number from the TPU metadata server (0 elsewhere): one log file per worker.
worker="$(curl -sf -m 5 -H 'Metadata-Flavor: Google' \
  'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number' \
  || echo 0)"

export T2JAX_DISTRIBUTED="${T2JAX_DISTRIBUTED:-1}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export PYTHONUNBUFFERED=1
cd "$repo"
exec "$venv/bin/python" -u "$@" >"$log_dir/log.w$worker" 2>&1
