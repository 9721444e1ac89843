#!/usr/bin/env bash
""":"
# APT video stage of the 8b model (paper §3.5): 1280x720 clips of 2 s at 24 fps, global batch 2048 (exact),
# 300 generator updates, lr 3e-6 for G and D, RMSProp alpha 0.9, no weight decay, no clipping, EMA 0.995,
# approximated R1 with lambda 100 and sigma 0.1, discriminator timestep shift 12, heads at layers 16/26/36,
# BF16 with DeepSpeed ZeRO-3 and activation checkpointing. G starts from the image stage's EMA generator; D
# is re-initialised from the diffusion weights (fresh heads). The paper used 1024 H100s.
#
#   export DATA_PATH=/data/videos_720p_2s                 # tools/preprocess_video.py output prefix(es)
#   export INIT=runs/apt_image_8b/export/generator_ema    # the image stage's EMA generator
#   export TEACHER=/models/diffusion_8b                   # the diffusion model (D's backbone)
#
#   deepspeed examples/pretrain_apt_video.sh [key=value ...]              # this node's GPUs
#   deepspeed --hostfile hostfile examples/pretrain_apt_video.sh          # every node of the hostfile
#   bash examples/pretrain_apt_video.sh                                   # torchrun on this node
#   NNODES=128 NODE_RANK=0 MASTER_ADDR=node0 bash examples/pretrain_apt_video.sh   # torchrun, run on each node
#   LAUNCHER=deepspeed HOSTFILE=hostfile bash examples/pretrain_apt_video.sh       # DeepSpeed launcher + hostfile
#   sbatch --nodes 128 --gpus-per-node 8 examples/pretrain_apt_video.sh           # Slurm: srun, one task per GPU
#   torchrun --nproc_per_node 8 examples/pretrain_apt_video.sh                     # any launcher that runs python
#
#   DRY_RUN=1 NNODES=128 bash examples/pretrain_apt_video.sh     # resolved config, layout, batch arithmetic
#   deepspeed examples/pretrain_apt_video.sh parallel.engine=pipeline parallel.pp=4 parallel.tp=2 parallel.sp=1
#                                  # pipeline layout: 4 stages, 1F1B, ZeRO-1 (tools/plan.py --engine pipeline)
#   DEBUG=1 deepspeed --num_gpus 2 examples/pretrain_apt_video.sh   # debug preset, synthetic data, 2 steps, fp32
#                                                                   # (runs on CPU with gloo too)
#
# DeepSpeed settings come from examples/ds_configs/zero3_bf16.json (merged over what the trainer builds);
# DS_CONFIG=FILE picks another, e.g. examples/ds_configs/zero3_offload_optimizer.json.
# Trailing key=value arguments override anything below (e.g. parallel.sp=4 micro_batch=1). Rerunning the
# same command resumes from the latest checkpoint in run_dir. Plan memory and time first:
#   python tools/plan.py --config examples/configs/apt_video_8b.yaml --gpus 1024
#
# This file is a bash script that Python can also read: launchers that run their target with python (the
# DeepSpeed launcher unless given --no_python, torchrun) reach the few Python lines at the end, which run it
# again with bash. `deepspeed --no_python examples/pretrain_apt_video.sh` and `bash ...` work as well.
SCRIPT_NAME=pretrain_apt_video.sh
CONFIG_NAME=apt_video_8b.yaml

need_env() {  # the inputs this stage needs (not in DEBUG or DRY_RUN mode)
  require DATA_PATH "the indexed dataset prefix of 1280x720 2 s video latents (tools/preprocess_video.py)"
  require INIT "the image stage's EMA generator, e.g. runs/apt_image_8b/export/generator_ema"
  require TEACHER "the diffusion model directory (the discriminator's backbone)"
}

set_args() {  # the inputs; every hyper-parameter comes from the YAML and the stage's defaults
  MODEL_ARGS=(
    "model.init=${INIT:-}"                # G: the image stage's EMA generator
    "model.teacher=${TEACHER:-}"          # D: re-initialised from the diffusion weights
  )
  DATA_ARGS=(
    "data.path=${DATA_PATH:-}"            # 16x13x90x160 latents (1280x720, 49 frames) + text states
  )
  DEEPSPEED_ARGS=(
    "parallel.deepspeed_config=${DS_CONFIG:-$ROOT/examples/ds_configs/zero3_bf16.json}"  # ZeRO / comm tuning
  )
  OUTPUT_ARGS=(${RUN_DIR:+"run_dir=$RUN_DIR"})
  DEBUG_ARGS=(
    model.preset=debug "model.init=$DEBUG_MODELS/init" "model.teacher=$DEBUG_MODELS/diffusion"
    data.path=null data.synthetic=true "data.synthetic_shape=[4,3,8,8]" data.synthetic_size=8 data.max_text_len=8
    steps=2 global_batch=2 micro_batch=1 precision=fp32 parallel.tp=1 parallel.sp=1
    parallel.zero_persistence_threshold=0 save_every=0 log_every=1 "run_dir=${RUN_DIR:-runs/debug_apt_video}"
    "parallel.deepspeed_config=${DS_CONFIG:-null}"    # the bf16 file does not suit this fp32 run
  )
  ARG_GROUPS=(MODEL_ARGS DATA_ARGS DEEPSPEED_ARGS OUTPUT_ARGS)
}

# ---- launch: these closing lines are the same in every examples/*.sh training script, on purpose: a
# launcher runs this very file (with bash, or with python for the lines at the end), so they cannot live in
# the shared examples/launch.sh, which does everything else.
set -euo pipefail
LAUNCH_SH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/launch.sh"
if [[ ! -f "$LAUNCH_SH" && -n "${SLURM_SUBMIT_DIR:-}" ]]; then
  LAUNCH_SH="$SLURM_SUBMIT_DIR/examples/launch.sh"  # sbatch runs a copy of this file from its spool folder
fi
if [[ ! -f "$LAUNCH_SH" ]]; then
  echo "error: cannot find examples/launch.sh (submit from the repository root)" >&2
  exit 2
fi
# shellcheck source=launch.sh
source "$LAUNCH_SH"
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
