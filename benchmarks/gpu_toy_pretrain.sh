#!/usr/bin/env bash
# Pretrains the toy diffusion model shipped in examples/toy/diffusion (on one GPU: a few minutes; the same
# command works on CPU, slowly). Usage: bash benchmarks/gpu_toy_pretrain.sh OUT_DIR [STEPS] [overrides...]
# The shipped weights: `bash benchmarks/gpu_toy_pretrain.sh OUT 3000`, then continued with
# `NUM=1024 bash benchmarks/gpu_toy_pretrain.sh OUT2 2000 model.init=OUT global_batch=128 micro_batch=128
#  optim.lr=5e-4 optim.warmup_steps=0` (see examples/toy/README.md).
set -euo pipefail
OUT="${1:?output folder}"; STEPS="${2:-3000}"; shift $(( $# >= 2 ? 2 : $# ))
W="${WORK:-/tmp/toy_pretrain}"; NUM="${NUM:-2048}"
mkdir -p "$W" "$OUT"
python3 tools/make_toy_dataset.py --output "$W/raw_videos" --num "$NUM" --size 24 --frames 8 --fps 4 --digit-size 8-10 --max-digits 1 --seed 100
python3 tools/make_toy_dataset.py --output "$W/raw_images" --num "$NUM" --size 24 --digit-size 8-10 --max-digits 1 --images --seed 101
python3 tools/preprocess_video.py --input "$W/raw_videos" --output "$W/videos" --resolution 24x24 --fps 4 --frames 8 --vae none --text-encoder none --max-text-len 32 --no-progress --workers 8
python3 tools/preprocess_video.py --input "$W/raw_images" --output "$W/images" --resolution 24x24 --vae none --text-encoder none --max-text-len 32 --no-progress --workers 8
python3 pretrain_apt.py --config examples/configs/toy_diffusion.yaml data.path="$W/videos,$W/images" run_dir="$W/run" steps="$STEPS" log_every=100 save_every=500 "$@"
cp "$W/run/export/model_ema/model.safetensors" "$W/run/export/model_ema/config.json" "$OUT/"
cp "$W/run/metrics.jsonl" "$OUT/pretrain_metrics.jsonl"
