#!/usr/bin/env bash
""":"
# Consistency distillation of the 8b diffusion model into G-hat (paper §3.2): discrete-time consistency
# distillation with the MSE loss; the frozen teacher takes one Euler step under constant classifier-free
# guidance 7.5 with a fixed negative prompt; the student is pulled to an EMA target. The product,
# run_dir/export/model_ema, initialises the APT generator (examples/pretrain_apt_image.sh). The paper gives
# no batch, learning rate or length for this stage: the values below are this project's choice.
#
#   export DATA_PATH=/data/images_1024,/data/videos_720p_2s   # tools/preprocess_video.py output prefix(es)
#   export TEACHER=/models/diffusion_8b                       # the diffusion model (also the student's start)
#
#   deepspeed examples/consistency_distill.sh [key=value ...]             # this node's GPUs
#   deepspeed --hostfile hostfile examples/consistency_distill.sh         # every node of the hostfile
#   bash examples/consistency_distill.sh                                  # torchrun on this node
#   NNODES=32 NODE_RANK=0 MASTER_ADDR=node0 bash examples/consistency_distill.sh   # torchrun, run on each node
#   LAUNCHER=deepspeed HOSTFILE=hostfile bash examples/consistency_distill.sh      # DeepSpeed launcher + hostfile
#   sbatch --nodes 32 --gpus-per-node 8 examples/consistency_distill.sh           # Slurm: srun, one task per GPU
#   torchrun --nproc_per_node 8 examples/consistency_distill.sh                    # any launcher that runs python
#
#   DRY_RUN=1 NNODES=32 bash examples/consistency_distill.sh     # resolved config, layout, batch arithmetic
#   DEBUG=1 deepspeed --num_gpus 2 examples/consistency_distill.sh  # debug preset, synthetic data, 2 steps, fp32
#                                                                   # (runs on CPU with gloo too)
#
# DeepSpeed settings come from examples/ds_configs/zero3_bf16.json (merged over what the trainer builds);
# DS_CONFIG=FILE picks another, e.g. examples/ds_configs/zero3_offload_optimizer.json.
# Trailing key=value arguments override anything below. Rerunning the same command resumes from the latest
# checkpoint in run_dir. Plan memory and time first (the teacher is held whole on every GPU):
#   python tools/plan.py --config examples/configs/cd_8b.yaml --gpus 256
#
# This file is a bash script that Python can also read: launchers that run their target with python (the
# DeepSpeed launcher unless given --no_python, torchrun) reach the few Python lines at the end, which run it
# again with bash. `deepspeed --no_python examples/consistency_distill.sh` and `bash ...` work as well.
SCRIPT_NAME=consistency_distill.sh
CONFIG_NAME=cd_8b.yaml

need_env() {  # the inputs this stage needs (not in DEBUG or DRY_RUN mode)
  require DATA_PATH "the indexed dataset prefix(es) of image and/or video latents (tools/preprocess_video.py)"
  require TEACHER "the diffusion model directory (the teacher, and the student's start unless INIT is set)"
}

set_args() {  # the inputs; every hyper-parameter comes from the YAML and the stage's defaults
  MODEL_ARGS=(
    "model.teacher=${TEACHER:-}"          # frozen, bf16, whole on every GPU
    "model.init=${INIT:-${TEACHER:-}}"    # the student starts from the diffusion weights
  )
  DATA_ARGS=(
    "data.path=${DATA_PATH:-}"
  )
  DEEPSPEED_ARGS=(
    "parallel.deepspeed_config=${DS_CONFIG:-$ROOT/examples/ds_configs/zero3_bf16.json}"  # ZeRO / comm tuning
  )
  OUTPUT_ARGS=(${RUN_DIR:+"run_dir=$RUN_DIR"})
  DEBUG_ARGS=(
    model.preset=debug "model.init=$DEBUG_MODELS/diffusion" "model.teacher=$DEBUG_MODELS/diffusion"
    data.path=null data.synthetic=true "data.synthetic_shape=[4,1,8,8]" data.synthetic_size=8 data.max_text_len=8
    steps=2 global_batch=2 micro_batch=1 precision=fp32 parallel.tp=1 parallel.sp=1 cd.num_steps=4
    parallel.zero_persistence_threshold=0 save_every=0 log_every=1 "run_dir=${RUN_DIR:-runs/debug_cd}"
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
