#!/usr/bin/env bash
# benchmarks/decode.py of two checkouts in one run, interleaved (A B A B), t2jax only.
#   bash experiments/records/decode.sh CHECKOUT_A CHECKOUT_B [BATCH_SIZES]
# Environment: PY (python with t2jax's dependencies; default python3).
set -euo pipefail
PY=${PY:-python3}
for round in 1 2; do
  for checkout in "$1" "$2"; do
    echo "== round $round: $checkout ($(git -C "$checkout" rev-parse --short HEAD))"
    (cd "$checkout" && PYTHONPATH=$PWD JAX_PLATFORMS=cpu "$PY" benchmarks/decode.py \
      --skip-transformers --batch-sizes "${3:-1,32}" 2>&1 | grep -v "^E0000\|^W0000")
  done
done
