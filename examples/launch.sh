#!/usr/bin/env bash
# The launcher shared by the examples/*.sh training scripts, which source it after defining SCRIPT_NAME,
# CONFIG_NAME, need_env and the flag groups. Not meant to be run on its own.
# Who runs this file decides what it does:
#   a launcher already started one process per GPU (RANK and WORLD_SIZE set: deepspeed, torchrun)
#                                       -> this process runs the trainer;
#   a task of an srun step (APT_SRUN_TASK=1, or SLURM_STEP_ID set)
#                                       -> SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID become RANK /
#                                          WORLD_SIZE / LOCAL_RANK, then the trainer;
#   inside a Slurm allocation (sbatch, salloc)
#                                       -> srun starts GPUS_PER_NODE tasks per node running this file;
#   LAUNCHER=deepspeed                  -> the DeepSpeed launcher on this node, or on every node of HOSTFILE;
#   otherwise                           -> torchrun for this node (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT).
# LAUNCHER=torchrun|deepspeed|slurm forces a mode. Extra launcher flags: TORCHRUN_ARGS, DS_ARGS, SRUN_ARGS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -f "$ROOT/pretrain_apt.py" && -n "${SLURM_SUBMIT_DIR:-}" ]]; then
  ROOT="$SLURM_SUBMIT_DIR"  # sbatch runs a copy of this file from its spool folder
fi
if [[ ! -f "$ROOT/pretrain_apt.py" ]]; then
  echo "error: cannot find pretrain_apt.py next to examples/ (submit from the repository root)" >&2
  exit 2
fi
SELF="$ROOT/examples/$SCRIPT_NAME"
CONFIG="$ROOT/examples/configs/$CONFIG_NAME"
PYTHON="${PYTHON:-python3}"
if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
  GPUS_PER_NODE="${GPUS_PER_NODE:-$SLURM_GPUS_ON_NODE}"
elif command -v nvidia-smi > /dev/null 2>&1; then
  GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L | grep -c GPU || true)}"
fi
GPUS_PER_NODE="${GPUS_PER_NODE:-1}"
[[ "$GPUS_PER_NODE" -ge 1 ]] || GPUS_PER_NODE=1
NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-6000}"
DEBUG_MODELS="${DEBUG_MODELS:-${TMPDIR:-/tmp}/megatron_apt_debug_models}"

USER_ARGS=()
for a in "$@"; do
  case "$a" in
    --local_rank=*|--local-rank=*) ;;  # the DeepSpeed launcher's; LOCAL_RANK is in the environment too
    *) USER_ARGS+=("$a") ;;
  esac
done

say() {  # once per job, not once per rank
  if [[ "${RANK:-0}" == 0 && "${SLURM_PROCID:-0}" == 0 ]]; then echo "$@" >&2; fi
}
require() {
  if [[ -z "${!1:-}" ]]; then
    say "error: set $1 to $2"
    say "       (or DEBUG=1 for the debug preset on synthetic data; see the top of examples/$SCRIPT_NAME)"
    exit 2
  fi
}

set_args
OPTS=()
for group in "${ARG_GROUPS[@]}"; do  # the flag groups of set_args, in order
  ref="${group}[@]"
  OPTS+=("${!ref}")
done
if [[ "${DEBUG:-0}" == 1 ]]; then
  OPTS+=("${DEBUG_ARGS[@]}")
elif [[ "${DRY_RUN:-0}" == 1 ]]; then
  OPTS+=("data.path=${DATA_PATH:-DATA_PATH}")  # the dry run reads no data: a placeholder if unset
else
  need_env
fi
TRAIN=("$PYTHON" "$ROOT/pretrain_apt.py" --config "$CONFIG" "${OPTS[@]}" ${USER_ARGS[@]+"${USER_ARGS[@]}"})

debug_models() {  # the debug preset's diffusion model and G-hat (seeded: identical wherever they are built)
  if [[ "${DEBUG:-0}" != 1 || -f "$DEBUG_MODELS/diffusion/config.json" ]]; then return 0; fi
  "$PYTHON" - "$DEBUG_MODELS" <<'PY'
import os, shutil, sys
from megatron_apt.checkpoint.model_dir import save_mmdit
from megatron_apt.models import build_mmdit
out = sys.argv[1]
tmp = f"{out}.tmp{os.getpid()}"
save_mmdit(build_mmdit("debug", zero_init=False, seed=1), os.path.join(tmp, "diffusion"))
save_mmdit(build_mmdit("debug", zero_init=False, seed=2), os.path.join(tmp, "init"), kind="consistency")
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
try:
    os.rename(tmp, out)  # atomic; another rank may have won the race
except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
PY
}

if [[ -n "${RANK:-}" && -n "${WORLD_SIZE:-}" ]]; then
  MODE=worker  # before LAUNCHER: the processes a launcher started inherit the launching environment
elif [[ "${APT_SRUN_TASK:-0}" == 1 ]]; then
  MODE=srun-task
elif [[ -n "${LAUNCHER:-}" ]]; then
  MODE="$LAUNCHER"
elif [[ "${SLURM_STEP_ID:-}" =~ ^[0-9]+$ && "${SLURM_STEP_ID}" -lt 4294967290 ]]; then
  MODE=srun-task  # srun ran this file itself (the batch step's id is 4294967294)
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  MODE=slurm
else
  MODE=torchrun
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  WORLD_SIZE="${WORLD_SIZE:-$((NNODES * GPUS_PER_NODE))}" exec "${TRAIN[@]}" --dry-run
fi
case "$MODE" in
  worker)
    debug_models
    exec "${TRAIN[@]}"
    ;;
  srun-task)
    export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != *,* ]]; then
      export LOCAL_RANK=0  # srun bound one GPU to this task
    fi
    if [[ -z "${MASTER_ADDR:-}" ]]; then
      MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
    fi
    export MASTER_ADDR MASTER_PORT
    debug_models
    exec "${TRAIN[@]}"
    ;;
  slurm)
    MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}"
    SRUN=(srun --nodes "$NNODES" --ntasks-per-node "$GPUS_PER_NODE" --kill-on-bad-exit=1
          "--export=ALL,APT_SRUN_TASK=1,MASTER_ADDR=$MASTER_ADDR,MASTER_PORT=$MASTER_PORT")
    say "launch: ${SRUN[*]} ${SRUN_ARGS:-} bash $SELF"
    # shellcheck disable=SC2086
    exec "${SRUN[@]}" ${SRUN_ARGS:-} bash "$SELF" ${USER_ARGS[@]+"${USER_ARGS[@]}"}
    ;;
  deepspeed)
    debug_models
    DS=(deepspeed --master_port "$MASTER_PORT")
    if [[ -n "${HOSTFILE:-}" ]]; then
      DS+=(--hostfile "$HOSTFILE")
      if [[ -n "${MASTER_ADDR:-}" ]]; then DS+=(--master_addr "$MASTER_ADDR"); fi
    else
      DS+=(--num_gpus "$GPUS_PER_NODE")
    fi
    say "launch: ${DS[*]} ${DS_ARGS:-} pretrain_apt.py"
    # shellcheck disable=SC2086
    exec "${DS[@]}" ${DS_ARGS:-} "${TRAIN[@]:1}"
    ;;
  torchrun)
    debug_models
    TR=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
        --nproc_per_node "$GPUS_PER_NODE" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT")
    say "launch: ${TR[*]} ${TORCHRUN_ARGS:-} pretrain_apt.py"
    # shellcheck disable=SC2086
    exec "${TR[@]}" ${TORCHRUN_ARGS:-} "${TRAIN[@]:1}"
    ;;
  *)
    echo "error: unknown LAUNCHER=$MODE (use torchrun, deepspeed or slurm)" >&2
    exit 2
    ;;
esac
