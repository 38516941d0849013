#!/usr/bin/env bash
# The records of a checkout: a fixed greedy `t2jax eval` (8 items) and a 2-update `t2jax train` on
# a tiny random model (docs/structure.md). Compare two checkouts with compare.py.
#   bash experiments/records/run.sh CHECKOUT OUT_DIR
# Environment: PY (python with t2jax's dependencies; default python3), T2JAX_DATA (benchmark data).
set -euo pipefail
CODE=$(cd "$1" && pwd); OUT=$2; rm -rf "$OUT"; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=$OUT/../tiny_model
[ -d "$MODEL" ] || (cd "$CODE" && PYTHONPATH=$CODE "$PY" "$HERE/make_tiny.py" "$MODEL")
export PYTHONPATH=$CODE JAX_PLATFORMS=cpu
MAIN=t2jax.cli; [ -f "$CODE/t2jax/cli/app.py" ] && MAIN=t2jax.cli.app
t2jax() { (cd "$CODE" && "$PY" -c "import sys; from $MAIN import main; sys.exit(main())" "$@"); }
t2jax eval --model "$MODEL" --task arc_easy --split test --limit 8 --max-new-tokens 16 \
  --out "$OUT/eval"
t2jax train --config=experiments/configs/svf.py:task=synthetic_letter,model="$MODEL" \
  --config.svf.cache_dir="$OUT/svd" --config.run.workdir="$OUT/train" --config.rl.batch_size=8 \
  --config.rl.num_iters=2 --config.rl.eval_every=1 --config.rl.samples_per_prompt=2 \
  --config.rl.temperature=1.0 --config.rl.microbatch_size=8 --config.rl.logprob_chunk=16 \
  --config.run.progress=false
