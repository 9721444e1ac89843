#!/usr/bin/env bash
""":"
# Flow-matching pretraining of the 8b MMDiT: the diffusion model that consistency distillation and APT start
# from (the paper post-trains an existing model; this script is for training your own). x_t = (1 - t) x0 +
# t eps, velocity target eps - x0, SD3's resolution-dependent timestep shift, 10% caption dropout, an fp32 EMA
# (export/model_ema). Optimizer, learning rate, batch and length are this project's choice, not the paper's.
#
#   export DATA_PATH=/data/images_1024,/data/videos_720p_2s   # tools/preprocess_video.py output prefix(es)
#
#   deepspeed examples/pretrain_diffusion.sh [key=value ...]              # this node's GPUs
#   deepspeed --hostfile hostfile examples/pretrain_diffusion.sh          # every node of the hostfile
#   bash examples/pretrain_diffusion.sh                                   # torchrun on this node
#   NNODES=32 NODE_RANK=0 MASTER_ADDR=node0 bash examples/pretrain_diffusion.sh    # torchrun, run on each node
#   LAUNCHER=deepspeed HOSTFILE=hostfile bash examples/pretrain_diffusion.sh       # DeepSpeed launcher + hostfile
#   sbatch --nodes 32 --gpus-per-node 8 examples/pretrain_diffusion.sh            # Slurm: srun, one task per GPU
#   torchrun --nproc_per_node 8 examples/pretrain_diffusion.sh                     # any launcher that runs python
#
#   DRY_RUN=1 NNODES=32 bash examples/pretrain_diffusion.sh      # resolved config, layout, batch arithmetic
#   DEBUG=1 deepspeed --num_gpus 2 examples/pretrain_diffusion.sh   # debug preset, synthetic data, 2 steps, fp32
#                                                                   # (runs on CPU with gloo too)
#
# Trailing key=value arguments override anything below. Rerunning the same command resumes from the latest
# checkpoint in run_dir. Plan memory and time first:
#   python tools/plan.py --config examples/configs/diffusion_8b.yaml --gpus 256
#
# This file is a bash script that Python can also read: launchers that run their target with python (the
# DeepSpeed launcher unless given --no_python, torchrun) reach the few Python lines at the end, which run it
# again with bash. `deepspeed --no_python examples/pretrain_diffusion.sh` and `bash ...` work as well.
SCRIPT_NAME=pretrain_diffusion.sh
CONFIG_NAME=diffusion_8b.yaml

need_env() {  # the inputs this stage needs (not in DEBUG or DRY_RUN mode)
  require DATA_PATH "the indexed dataset prefix(es) of image and/or video latents (tools/preprocess_video.py)"
}

set_args() {
  MODEL_ARGS=(
    model.preset=8b                       # 36 blocks, 3072 wide, 8.2 B parameters
    "model.init=${INIT:-null}"            # optional: continue from a model directory
  )
  DATA_ARGS=(
    "data.path=${DATA_PATH:-}"
    data.max_text_len=512
  )
  TRAINING_ARGS=(
    stage=flow
    steps=100000
    global_batch=2048
    micro_batch=1
    precision=bf16
  )
  OPTIMIZER_ARGS=(
    optim.optimizer=adamw
    optim.lr=1e-4
    "optim.betas=[0.9,0.999]"
    optim.weight_decay=0
    optim.grad_clip=1.0
    optim.warmup_steps=1000
  )
  FLOW_ARGS=(
    flow.shift=null                       # resolution dependent: sqrt(tokens / 256), as SD3
    flow.text_dropout=0.1                 # caption dropout for classifier-free guidance
    apt.ema_decay=0.9999                  # the EMA the flow stage keeps (export/model_ema)
  )
  PARALLEL_ARGS=(
    parallel.engine=deepspeed
    parallel.zero_stage=3
    parallel.tp=1
    parallel.sp=1
    parallel.activation_checkpointing=true
  )
  OUTPUT_ARGS=(
    "run_dir=${RUN_DIR:-runs/diffusion_8b}"
    save_every=1000
    log_every=10
  )
  DEBUG_ARGS=(
    model.preset=debug model.init=null
    data.path=null data.synthetic=true "data.synthetic_shape=[4,2,8,8]" data.synthetic_size=8 data.max_text_len=8
    steps=2 global_batch=2 micro_batch=1 precision=fp32 parallel.tp=1 parallel.sp=1
    parallel.zero_persistence_threshold=0 save_every=0 log_every=1 "run_dir=${RUN_DIR:-runs/debug_diffusion}"
  )
  ARG_GROUPS=(MODEL_ARGS DATA_ARGS TRAINING_ARGS OPTIMIZER_ARGS FLOW_ARGS PARALLEL_ARGS OUTPUT_ARGS)
}

# ---- launch: the same in every examples/*.sh training script -------------------------------------------
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
from megatron_apt.models import build_mmdit, save_mmdit
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
exit 1
: <<'# end of the Python part'
"""
# Python reads this file only when a launcher runs it with python (the DeepSpeed launcher without
# --no_python, torchrun): hand it over to bash, which runs everything above.
import os
import sys

os.environ.setdefault("PYTHON", sys.executable)
os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
# end of the Python part
