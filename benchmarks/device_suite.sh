#!/usr/bin/env bash
# The accelerator checks of issue 17 in one command, for a lent GPU (or TPU) machine that the real
# weights cannot reach: every model is `random:DIR`, the real architecture and tokenizer with
# random weights (throughput depends on shapes, not values; see t2jax/checkpoints/synthetic.py).
#
#   1. decode (benchmarks/decode.py): Qwen2.5-Coder-0.5B at batch 1/32/256, t2jax bf16 against
#      transformers bf16 on the same GPU, with the matmul and memory (HBM roofline) bounds;
#   2. few-shot CEM, one generation batched vs sequential (experiments/adapt_cem_benchmark.py);
#   3. an RL update split into rollout / scoring / gradient (benchmarks/rl_step.py), one process
#      per gradient variant (sharing a process, the variants slowed each other 5-10x on the H200);
#   4. decode on the Llama-3-8B architecture (the paper's model) at batch 1/32/256;
#   5. (graphs) decode at batch 1/32, plain and fused, under three XLA command-buffer (CUDA graph)
#      settings: the default, none, and the default plus WHILE and CONDITIONAL (the decode loop).
#
# PARTS (default: decode,cem,rl,llama8b) picks the parts by name, e.g. PARTS=graphs.
# Each part runs under its own time limit and writes its own log under $OUT; a part that fails
# or runs out of time leaves the others alone. Prepare the carried folder here first:
#
#   t2jax export --model qwen2.5-coder-0.5b-instruct --architecture-only --out .devcarry/arch/qwen2.5-coder-0.5b-instruct
#   t2jax export --model smollm2-135m-instruct --architecture-only --out .devcarry/arch/smollm2-135m-instruct
#   cp -r ../shared/data/arc ../shared/data/gsm8k .devcarry/data/    # benchmark data: never committed
#   pip download (README of the device tool) gguf==0.19.0 ml_collections platformdirs tensorboardX -d .devcarry/whl
#
# then run `bash benchmarks/device_suite.sh` there with `.devcarry` carried. SUITE_SMOKE=1 runs
# every part on SmolLM2's architecture with tiny sizes (a check of this script on a CPU).
set -u
CARRY=${CARRY:-.devcarry}
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
if ls "$CARRY"/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$CARRY"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export T2JAX_DATA=$CARRY/data PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in the decode part.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
PY=${PY:-python3}

QWEN=random:$CARRY/arch/qwen2.5-coder-0.5b-instruct
LLAMA_DIR=/tmp/t2jax-arch/llama-3-8b
if [ "${SUITE_SMOKE:-0}" = 1 ]; then
  QWEN=random:$CARRY/arch/smollm2-135m-instruct
  BATCHES=1,2 NEW=4 SHOTS=2 POP=10 CEM_NEW=4 RL_SET="--set rl.batch_size=2 --set rl.microbatch_size=2 --set task.max_new_tokens=4"
  LIMIT=900
else
  BATCHES=1,32,256 NEW=128 SHOTS=10 POP=32 CEM_NEW=64 RL_SET=""
  LIMIT=0
fi

PARTS=${PARTS:-decode,cem,rl,llama8b}
want() { [[ ",$PARTS," == *",$1,"* ]]; }

part() {  # part NAME SECONDS COMMAND...: one check, its log in $OUT/NAME.txt
  local name=$1 seconds=$2
  shift 2
  [ "$LIMIT" -gt 0 ] && seconds=$LIMIT
  echo "== $name (limit ${seconds}s): $*" | tee -a "$OUT/suite.txt"
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/suite.txt"
  grep -vE 'All log messages before|cudart_stub|^[IW][0-9]{4} ' "$OUT/$name.txt" | tail -25 |
    tee -a "$OUT/suite.txt"
}

{
  date -u
  nvidia-smi -L 2>/dev/null
  $PY -c "import jax, sys; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
  $PY -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|transformers|torch) '
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >>"$OUT/suite.txt"

want decode && part decode_qwen 170 $PY benchmarks/decode.py --model "$QWEN" \
  --batch-sizes $BATCHES --new-tokens $NEW --dtypes bf16
want cem && part cem_qwen 110 $PY experiments/adapt_cem_benchmark.py --model "$QWEN" \
  --task arc_challenge --shots $SHOTS --population $POP --max-new-tokens $CEM_NEW
if want rl; then
  for variant in "before: merged, lm_head on every position" auto factored; do
    # shellcheck disable=SC2086
    part "rl_qwen_${variant%%:*}" 100 $PY benchmarks/rl_step.py --model "$QWEN" --task gsm8k \
      --steps 3 --variants "$variant" $RL_SET
  done
fi
if want graphs; then
  GRAPH_BATCHES=${BATCHES%,*}  # 1,32 (1 in the smoke)
  COMMAND_BUFFERS="FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
  for setting in default none while; do
    case $setting in
      default) flags="" ;;
      none) flags="--xla_gpu_enable_command_buffer=" ;;
      while) flags="--xla_gpu_enable_command_buffer=$COMMAND_BUFFERS" ;;
    esac
    part "graphs_$setting" 120 env XLA_FLAGS="$flags" $PY benchmarks/decode.py --model "$QWEN" \
      --batch-sizes "$GRAPH_BATCHES" --new-tokens $NEW --dtypes bf16 --skip-transformers --fused
  done
fi
if want llama8b && [ "${SUITE_SMOKE:-0}" != 1 ]; then
  # The paper's Llama-3-8B architecture with SmolLM2's tokenizer (its ids fit Llama-3's vocab).
  $PY - "$CARRY/arch/smollm2-135m-instruct" "$LLAMA_DIR" <<'EOF'
import json, pathlib, shutil, sys
from t2jax.plan.models import PAPER_MODELS
source, target = map(pathlib.Path, sys.argv[1:])
shutil.copytree(source, target, dirs_exist_ok=True)
config = {**PAPER_MODELS["Llama-3-8B-Instruct"], **{k: v for k, v in json.loads((source / "config.json").read_text()).items() if k.endswith("token_id")}}
(target / "config.json").write_text(json.dumps(config))
EOF
  part decode_llama8b 130 $PY benchmarks/decode.py --model "random:$LLAMA_DIR" \
    --batch-sizes $BATCHES --new-tokens $NEW --dtypes bf16 --skip-transformers
fi
