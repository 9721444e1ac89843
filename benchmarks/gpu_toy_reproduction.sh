#!/usr/bin/env bash
# The toy reproduction of the paper on one GPU: consistency distillation, the APT image and video stages
# (and the ablations of §5) from a toy diffusion teacher, each scored with tools/evaluate.py.
#
#   bash benchmarks/gpu_toy_reproduction.sh WORK TEACHER_DIR STAGE [STAGE ...]
#
# Stages: data (the toy data, drawn as in benchmarks/gpu_toy_teacher.sh), cd. A finished stage (its export
# exists) is skipped, and a killed one resumes from its last checkpoint when the command is run again.
set -euo pipefail
W="${1:?work folder}"; TEACHER="${2:?teacher model dir}"; shift 2
NUM="${NUM:-60000}"; NEVAL="${NEVAL:-256}"
mkdir -p "$W"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
TOY=(--size 24 --frames 8 --fps 4 --digit-size 8-10 --max-digits 1 --max-text-len 32 --workers 8)
GPU=(precision=bf16 data.preload=true log_every=50)
evaluate() {  # name model_spec... (on held-out videos and images)
  local name=$1; shift
  local specs=(); for m in "$@"; do specs+=(--model "$m"); done
  python3 tools/evaluate.py --real "$W/heldout_videos" --prompts-from-real "$NEVAL" --out "$W/eval-$name-videos" \
    "${specs[@]}" --cache-dir "$W/cache" > "$W/eval-$name-videos.log" 2>&1 &
  python3 tools/evaluate.py --real "$W/heldout_images" --prompts-from-real "$NEVAL" --out "$W/eval-$name-images" \
    "${specs[@]}" --cache-dir "$W/cache" > "$W/eval-$name-images.log" 2>&1 &
}
for stage in "$@"; do
  case "$stage" in
    data)
      [ -f "$W/videos.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/videos" --num "$NUM" --seed 100 "${TOY[@]}" &
      [ -f "$W/images.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/images" --num "$NUM" --seed 101 --images "${TOY[@]}" &
      [ -f "$W/heldout_videos.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/heldout_videos" --num 512 --seed 200 "${TOY[@]}" &
      [ -f "$W/heldout_images.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/heldout_images" --num 512 --seed 201 --images "${TOY[@]}" &
      wait ;;
    cd)
      [ -f "$W/cd/export/model_ema/config.json" ] || python3 pretrain_apt.py --config examples/configs/toy_cd.yaml \
        data.path="$W/videos,$W/images" run_dir="$W/cd" model.init="$TEACHER" "${GPU[@]}" \
        steps="${CD_STEPS:-2000}" global_batch=256 micro_batch=256 save_every=500 \
        optim.optimizer=adamw optim.lr=1e-4 optim.betas=[0.9,0.99] optim.warmup_steps=100 > "$W/cd.log" 2>&1
      tail -n 2 "$W/cd.log"
      evaluate cd "cd1=$W/cd/export/model_ema:1" "cd1raw=$W/cd/export/model:1" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
  say "$stage done"
done
wait
