#!/usr/bin/env bash
# The toy reproduction of the paper on one GPU: consistency distillation, the APT image and video stages
# (and the no-aR1 ablation of §5 / Fig. 5) from a toy diffusion teacher, each scored with tools/evaluate.py.
#
#   bash benchmarks/gpu_toy_reproduction.sh WORK TEACHER_DIR STAGE [STAGE ...]
#
# Stages, in the order of the recipe:
#   data             the toy data, drawn as in benchmarks/gpu_toy_teacher.sh (train sets + 512 held out)
#   cd               consistency distillation from the teacher (CFG 7.5, the fixed negative prompt) -> G-hat
#   apt_image        APT image stage: G from the CD EMA, D from the teacher (350 updates, §3.5)
#   apt_image_no_r1  the same without approximated R1 (the paper: D loss -> 0, G collapses)
#   apt_video        APT video stage: G from the image stage's EMA, D again from the teacher (300 updates)
#   eval             tools/evaluate.py on held-out videos and images: diffusion 25 steps (CFG 7.5 at every step,
#                    and only for t in the guidance interval GI, default 0-0.6) and 1 step,
#                    CD 1 step, APT image 1 step, APT video 1 and 2 steps (zero-shot), the ablation
#   pack             PACK=DIR: logs, metrics, evaluation reports in DIR/results.tgz, the APT video EMA generator
#                    in DIR/apt_generator.tar
# A finished stage (its export exists) is skipped, and a killed one resumes from its last checkpoint when the
# command is run again. The per-stage paper values (learning rate, aR1 sigma, shift, EMA) come from the
# config code and examples/configs/toy_*.yaml; only the batch and the GPU settings are set here.
set -euo pipefail
W="${1:?work folder}"; TEACHER="${2:?teacher model dir}"; shift 2
NUM="${NUM:-60000}"; NEVAL="${NEVAL:-256}"; CACHE="${CACHE:-$W/cache}"
mkdir -p "$W"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
TOY=(--size 24 --frames 8 --fps 4 --digit-size 8-10 --max-digits 1 --max-text-len 32 --workers "${WORKERS:-8}")
GPU=(precision=bf16 data.preload=true log_every=25)
P="python3 pretrain_apt.py"
train() {  # name config [overrides...]: runs unless the stage's export exists; the log goes to W/name.log
  local name=$1 config=$2; shift 2
  if [ -f "$W/$name/export/config.json" ] || [ -d "$W/$name/export/generator_ema" ] || \
     [ -d "$W/$name/export/model_ema" ]; then say "$name: done before"; return; fi
  $P --config "examples/configs/$config.yaml" run_dir="$W/$name" "${GPU[@]}" "$@" > "$W/$name.log" 2>&1 || \
    { tail -n 30 "$W/$name.log"; return 1; }
  grep -E "step +[0-9]+/" "$W/$name.log" | tail -n 1
}
for stage in "$@"; do
  case "$stage" in
    data)
      [ -f "$W/videos.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/videos" --num "$NUM" --seed 100 "${TOY[@]}" &
      [ -f "$W/images.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/images" --num "$NUM" --seed 101 --images "${TOY[@]}" &
      [ -f "$W/heldout_videos.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/heldout_videos" --num 512 --seed 200 "${TOY[@]}" &
      [ -f "$W/heldout_images.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/heldout_images" --num 512 --seed 201 --images "${TOY[@]}" &
      wait
      for f in videos images heldout_videos heldout_images; do [ -f "$W/$f.json" ] || { echo "data set $f was not written" >&2; exit 1; }; done ;;
    cd)
      train cd toy_cd data.path="$W/videos,$W/images" model.init="$TEACHER" steps="${CD_STEPS:-1000}" \
        global_batch="${CD_BATCH:-256}" micro_batch="${CD_BATCH:-256}" save_every=250 ;;
    apt_image+no_r1)  # both image runs at once (a toy model leaves most of the GPU idle)
      bash "$0" "$W" "$TEACHER" apt_image & a=$!
      bash "$0" "$W" "$TEACHER" apt_image_no_r1 & b=$!
      wait $a; wait $b || echo "the no-aR1 ablation failed (see $W/apt_image_no_r1.log)" ;;
    apt_image|apt_image_no_r1)
      extra=(); [ "$stage" = apt_image_no_r1 ] && extra=(apt.use_r1=false)
      train "$stage" toy_apt_image data.path="$W/images" model.init="$W/cd/export/model_ema" model.teacher="$TEACHER" \
        steps="${IMG_STEPS:-350}" global_batch="${IMG_BATCH:-512}" micro_batch="${IMG_BATCH:-512}" save_every=50 \
        "${extra[@]}" ;;
    apt_video)
      train apt_video toy_apt_video data.path="$W/videos" model.init="$W/apt_image/export/generator_ema" \
        model.teacher="$TEACHER" steps="${VID_STEPS:-300}" global_batch="${VID_BATCH:-64}" \
        micro_batch="${VID_BATCH:-64}" save_every=50 ;;
    eval)
      models=(--model "diffusion25=$TEACHER:25:7.5" --model "diffusion25_gi=$TEACHER:25:7.5:${GI:-0-0.6}"
              --model "diffusion1=$TEACHER:1:1" --model "cd1=$W/cd/export/model_ema:1"
              --model "apt_image1=$W/apt_image/export/generator_ema:1")
      [ -d "$W/apt_image_no_r1/export/generator_ema" ] && models+=(--model "apt_image_no_r1=$W/apt_image_no_r1/export/generator_ema:1")
      vmodels=("${models[@]}" --model "apt_video1=$W/apt_video/export/generator_ema:1"
               --model "apt_video2=$W/apt_video/export/generator_ema:2" --model "apt_video1_raw=$W/apt_video/export/generator:1")
      python3 tools/evaluate.py --real "$W/heldout_videos" --prompts-from-real "$NEVAL" --out "$W/eval-videos" \
        "${vmodels[@]}" --cache-dir "$CACHE" --batch-size 128 > "$W/eval-videos.log" 2>&1 &
      python3 tools/evaluate.py --real "$W/heldout_images" --prompts-from-real "$NEVAL" --out "$W/eval-images" \
        "${models[@]}" --cache-dir "$CACHE" --batch-size 128 > "$W/eval-images.log" 2>&1 &
      wait
      cat "$W/eval-videos/metrics.md" "$W/eval-images/metrics.md" ;;
    pack)  # PACK=DIR: the logs, metrics, configs, plots and evaluation reports in one tarball, the APT video
           # generator's EMA weights beside it
      mkdir -p "${PACK:?PACK=DIR}" "$W/pack"
      for r in cd apt_image apt_image_no_r1 apt_video; do
        [ -d "$W/$r" ] || continue
        mkdir -p "$W/pack/$r"; cp "$W/$r.log" "$W/$r/metrics.jsonl" "$W/$r/config.yaml" "$W/pack/$r/" 2>/dev/null || true
      done
      for e in eval-videos eval-images; do [ -d "$W/$e" ] && cp -r "$W/$e" "$W/pack/"; cp "$W/$e.log" "$W/pack/" 2>/dev/null || true; done
      tar czf "$PACK/results.tgz" -C "$W/pack" .
      [ -d "$W/apt_video/export/generator_ema" ] && tar cf "$PACK/apt_generator.tar" -C "$W/apt_video/export" generator_ema
      true ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
  say "$stage done"
done
wait
