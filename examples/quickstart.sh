#!/usr/bin/env bash
# The embedded default, end to end: toy data -> preprocessing -> (shipped) toy diffusion model ->
# consistency distillation -> APT image stage -> APT video stage (+ the no-aR1 ablation) -> one-step
# samples (mp4 + PNG grid) -> training curves and the evaluation report. Runs on CPU (2 cores: about 8
# minutes after install); uses the GPU when there is one.
#
#   bash examples/quickstart.sh [RUN_DIR]
#
# Environment knobs: QUICK=1 runs a few steps per stage (the CI smoke test); PRETRAIN=1 retrains the toy
# diffusion model instead of using the shipped one (slow on CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
START=$(date +%s)
RUN="${1:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}"
if [ -d "$RUN/cd" ] || [ -d "$RUN/apt_image" ]; then  # the trainer resumes each stage from its run folder
  echo "note: $RUN already holds a quickstart run; its stages resume from their checkpoints (a finished stage is" \
       "not retrained). Give a new folder for a fresh run."
fi
mkdir -p "$RUN"
RUN="$(cd "$RUN" && pwd)"
QUICK="${QUICK:-0}"
P="python pretrain_apt.py"
say() { printf '\n==> [%4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }

if [ "$QUICK" = 1 ]; then
  NV=32; NI=32; S_CD="steps=2"; S_IMG="steps=2"; S_VID="steps=2"; S_ABL="steps=2"; NEVAL=8
else
  NV=256; NI=256; S_CD=""; S_IMG=""; S_VID=""; S_ABL=""; NEVAL=32
fi

say "1/8 toy data: moving handwritten digits (scikit-learn) as real mp4 files and PNG images"
python tools/make_toy_dataset.py --output "$RUN/data/raw_videos" --num $NV --size 24 --frames 8 --fps 4 \
  --digit-size 8-10 --max-digits 1 --seed 0
python tools/make_toy_dataset.py --output "$RUN/data/raw_images" --num $NI --size 24 --digit-size 8-10 \
  --max-digits 1 --images --seed 1

say "2/8 preprocess into Megatron indexed datasets (pixels + byte tokens)"
python tools/preprocess_video.py --input "$RUN/data/raw_videos" --output "$RUN/data/videos" --resolution 24x24 \
  --fps 4 --frames 8 --vae none --text-encoder none --max-text-len 32 --no-progress
python tools/preprocess_video.py --input "$RUN/data/raw_images" --output "$RUN/data/images" --resolution 24x24 \
  --vae none --text-encoder none --max-text-len 32 --no-progress
DATA_V="$RUN/data/videos"; DATA_I="$RUN/data/images"

say "3/8 the toy diffusion model"
DIFF="$ROOT/examples/toy/diffusion"
if [ "${PRETRAIN:-0}" = 1 ] || [ ! -f "$DIFF/model.safetensors" ]; then
  $P --config examples/configs/toy_diffusion.yaml data.path="$DATA_V,$DATA_I" run_dir="$RUN/diffusion" \
    $( [ "$QUICK" = 1 ] && echo steps=4 )
  DIFF="$RUN/diffusion/export/model_ema"
fi
echo "diffusion model: $DIFF"

say "4/8 consistency distillation (CFG 7.5) -> G-hat"
$P --config examples/configs/toy_cd.yaml data.path="$DATA_V,$DATA_I" run_dir="$RUN/cd" model.init="$DIFF" $S_CD

say "5/8 APT image stage (and the same stage without approximated R1: the paper's Fig. 5 ablation)"
$P --config examples/configs/toy_apt_image.yaml data.path="$DATA_I" run_dir="$RUN/apt_image" \
  model.init="$RUN/cd/export/model_ema" model.teacher="$DIFF" $S_IMG
$P --config examples/configs/toy_apt_image.yaml data.path="$DATA_I" run_dir="$RUN/apt_image_no_r1" \
  model.init="$RUN/cd/export/model_ema" model.teacher="$DIFF" apt.use_r1=false $S_ABL

say "6/8 APT video stage (G from the image stage's EMA, D re-initialised from the diffusion weights)"
$P --config examples/configs/toy_apt_video.yaml data.path="$DATA_V" run_dir="$RUN/apt_video" \
  model.init="$RUN/apt_image/export/generator_ema" model.teacher="$DIFF" $S_VID
G="$RUN/apt_video/export/generator_ema"

say "7/8 one-step samples"
printf '%s\n' "the digit 0 moving left" "the digit 1 moving right" "the digit 2 moving up" "the digit 3 moving down" \
  "the digit 4 moving left" "the digit 5 moving right" "the digit 6 moving up" "the digit 7 moving down" > "$RUN/prompts.txt"
python tools/generate.py --model "$G" --prompts-file "$RUN/prompts.txt" --resolution 24x24 --frames 8 --fps 4 \
  --steps 1 --out "$RUN/samples/apt_1step" --grid-scale 4
python tools/generate.py --model "$G" --prompts-file "$RUN/prompts.txt" --resolution 24x24 --frames 8 --fps 4 \
  --steps 2 --out "$RUN/samples/apt_2step" --grid-scale 4

say "8/8 training curves (losses, logit gap, aR1, gradient norms, throughput, memory) and the evaluation report"
python tools/plot_run.py "$RUN/cd" "$RUN/apt_image" "$RUN/apt_image_no_r1" "$RUN/apt_video"
python tools/evaluate.py --quickstart "$RUN" --diffusion "$DIFF" --num $NEVAL --out "$RUN/report" \
  --model "shipped_apt1=$ROOT/examples/toy/apt_generator:1"

END=$(date +%s)
say "done in $(( END - START )) s"
echo "run folder: $RUN"
echo "  samples:  $RUN/samples/apt_1step (mp4 + grid.png), $RUN/samples/apt_2step"
echo "  curves:   $RUN/{cd,apt_image,apt_image_no_r1,apt_video}/plots/*.png"
echo "  report:   $RUN/report/report.md (metrics, samples and the training curves)"
