# shellcheck shell=bash
# TPU VM function library for t2jax (anchors-style section 6.10). Source it, then call t2_* :
#
#   export TPU_NAME=t2-v5e PROJECT=my-project ZONE=us-west4-a ACCEL=v5litepod-8
#   source launch/tpu.sh
#   t2_create && t2_push && t2_setup
#   t2_run experiments/train_svf.py \
#       --config=experiments/configs/svf.py:model=qwen2.5-coder-0.5b-instruct,task=gsm8k \
#       --config.run.workdir=gs://my-bucket/runs/gsm8k
#   t2_logs 0; t2_stop; t2_delete
#
# Settings (environment): TPU_NAME, PROJECT, ZONE (required); ACCEL (default v5litepod-8);
# RUNTIME (TPU software version, default v2-alpha-tpuv5-lite); SPOT=1 for spot capacity;
# REMOTE_DIR (checkout on the workers, default t2jax); LOG_DIR (default t2jax-logs).
# Every command runs on all workers of a multi-host slice; `launch/run_on_vm.sh` gives each
# worker its own log file, and the Python side calls jax.distributed.initialize()
# (T2JAX_DISTRIBUTED=1). Runs resume from their orbax checkpoints, so `t2_babysit` can recreate a
# preempted spot VM and relaunch the same command.

: "${ACCEL:=v5litepod-8}"
: "${RUNTIME:=v2-alpha-tpuv5-lite}"
: "${SPOT:=0}"
: "${REMOTE_DIR:=t2jax}"
: "${LOG_DIR:=t2jax-logs}"
: "${RETRIES:=5}"

_t2_check() {
  local name
  for name in TPU_NAME PROJECT ZONE; do
    if [[ -z "${!name:-}" ]]; then
      echo "t2: set $name first" >&2
      return 1
    fi
  done
}

_t2_gcloud() {
  gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"
}

# Runs a shell command on one worker (t2_ssh 0 'cmd') or all of them (t2_ssh all 'cmd').
t2_ssh() {
  _t2_check || return 1
  local worker="$1"
  shift
  _t2_gcloud ssh "$TPU_NAME" --worker="$worker" --command="$*"
}

# Creates the TPU VM, retrying while capacity is short.
t2_create() {
  _t2_check || return 1
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  local attempt
  for ((attempt = 1; attempt <= RETRIES; attempt++)); do
    if _t2_gcloud create "$TPU_NAME" --accelerator-type="$ACCEL" --version="$RUNTIME" \
      "${spot[@]}"; then
      return 0
    fi
    echo "t2_create: attempt $attempt failed; retrying in 60 s" >&2
    sleep 60
  done
  return 1
}

# Copies the committed tree (git archive of HEAD) to every worker and checks it arrived.
t2_push() {
  _t2_check || return 1
  local root archive attempt
  root="$(git rev-parse --show-toplevel)" || return 1
  archive="$(mktemp -t t2jax-XXXXXX.tar.gz)"
  git -C "$root" archive --format=tar.gz -o "$archive" HEAD || return 1
  for ((attempt = 1; attempt <= RETRIES; attempt++)); do
    if _t2_gcloud scp "$archive" "$TPU_NAME:t2jax.tar.gz" --worker=all &&
      t2_ssh all "mkdir -p $REMOTE_DIR && tar -xzf t2jax.tar.gz -C $REMOTE_DIR && \
        test -f $REMOTE_DIR/pyproject.toml"; then
      rm -f "$archive"
      echo "pushed $(git -C "$root" rev-parse --short HEAD) to $TPU_NAME:$REMOTE_DIR"
      return 0
    fi
    echo "t2_push: attempt $attempt failed; retrying" >&2
    sleep 10
  done
  rm -f "$archive"
  return 1
}

# Installs the package on every worker (idempotent).
t2_setup() {
  t2_ssh all "bash $REMOTE_DIR/launch/vm_setup.sh $REMOTE_DIR"
}

# Starts a Python script (and its arguments) on every worker inside tmux session "t2".
t2_run() {
  local quoted
  quoted="$(printf '%q ' "$@")"
  t2_ssh all "tmux new-session -d -s t2 'LOG_DIR=$LOG_DIR bash $REMOTE_DIR/launch/run_on_vm.sh \
    $REMOTE_DIR $quoted'"
}

# Shows the tail of a worker's log (default worker 0).
t2_logs() {
  local worker="${1:-0}"
  t2_ssh "$worker" "tail -n 200 $LOG_DIR/log.w$worker"
}

# Stops the run on every worker.
t2_stop() {
  t2_ssh all "tmux kill-session -t t2 || true"
}

# Deletes the TPU VM.
t2_delete() {
  _t2_check || return 1
  _t2_gcloud delete "$TPU_NAME" --quiet
}

# The VM's state (READY, PREEMPTED, ...), or NOT_FOUND.
t2_state() {
  _t2_check || return 1
  _t2_gcloud describe "$TPU_NAME" --format="value(state)" 2>/dev/null || echo NOT_FOUND
}

# Keeps a run alive on spot capacity: recreates a preempted or missing VM, pushes, sets up and
# relaunches the same command (the run resumes from its checkpoints). Stops when the run's
# summary.json exists in WORKDIR (a path every worker can read, e.g. gs://).
#   WORKDIR=gs://bucket/runs/gsm8k t2_babysit experiments/train_svf.py --config=... \
#       --config.run.workdir=gs://bucket/runs/gsm8k
t2_babysit() {
  : "${WORKDIR:?set WORKDIR to the run directory}"
  while ! gsutil -q stat "$WORKDIR/summary.json" 2>/dev/null; do
    case "$(t2_state)" in
      READY)
        if ! t2_ssh 0 "tmux has-session -t t2" 2>/dev/null; then
          t2_run "$@"
        fi
        ;;
      PREEMPTED | TERMINATED)
        t2_delete && t2_create && t2_push && t2_setup && t2_run "$@"
        ;;
      NOT_FOUND)
        t2_create && t2_push && t2_setup && t2_run "$@"
        ;;
    esac
    sleep 300
  done
  echo "t2_babysit: $WORKDIR finished"
}
