#!/usr/bin/env bash
# Pretrains toy diffusion teachers (flow matching) on one GPU within a wall-clock budget, then scores each
# with tools/evaluate.py (25 Euler steps, CFG 7.5 at every step and only for t in the guidance interval GI) on
# held-out toy data. Several variants train at once on the one GPU (a toy model leaves most of it idle).
# examples/toy/README.md reports what it measured.
#
#   bash benchmarks/gpu_toy_teacher.sh OUT [BUDGET_S] ["name: overrides" ...]
#   e.g. bash benchmarks/gpu_toy_teacher.sh out 420 "toy:" 'wide: model.overrides={"hidden_size":192,"num_heads":6}'
#
# The data: NUM videos and NUM images drawn straight into indexed data sets (seeds 100/101), 512 held-out
# videos and images (seeds 200/201) as the evaluation's real data. A 40-step probe of all variants at once
# measures the step time; the number of steps is then chosen to fill BUDGET_S (the cosine schedule needs it
# up front). OUT receives each variant's export (model_ema), metrics.jsonl and evaluation, in a tarball.
set -euo pipefail
OUT="${1:?output folder}"; BUDGET="${2:-420}"; shift $(( $# >= 2 ? 2 : $# ))
[ $# -gt 0 ] || set -- "toy:"
W="${WORK:-/tmp/toy_teacher}"; NUM="${NUM:-60000}"; NEVAL="${NEVAL:-256}"; CACHE="${CACHE:-$W/cache}"
GI="${GI:-0-0.6}"  # the guidance interval of the second 25-step row (docs/toy_reproduction.md)
mkdir -p "$W" "$OUT"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
TOY=(--size 24 --frames 8 --fps 4 --digit-size 8-10 --max-digits 1 --max-text-len 32 --workers 8)
[ -f "$W/videos.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/videos" --num "$NUM" --seed 100 "${TOY[@]}" &
[ -f "$W/images.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/images" --num "$NUM" --seed 101 --images "${TOY[@]}" &
[ -f "$W/heldout_videos.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/heldout_videos" --num 512 --seed 200 "${TOY[@]}" &
[ -f "$W/heldout_images.json" ] || python3 tools/make_toy_dataset.py --indexed "$W/heldout_images" --num 512 --seed 201 --images "${TOY[@]}" &
wait
for f in videos images heldout_videos heldout_images; do [ -f "$W/$f.json" ] || { echo "data set $f was not written" >&2; exit 1; }; done
say "data ready"
names=(); overrides=()
for v in "$@"; do names+=("${v%%:*}"); overrides+=("${v#*:}"); done
run() {  # name steps run_dir [extra...]
  local i=$1 steps=$2 dir=$3; shift 3
  # shellcheck disable=SC2086  # a variant's overrides are words separated by spaces
  ${PREFIX:-} python3 pretrain_apt.py --config examples/configs/toy_diffusion_gpu.yaml data.path="$W/videos,$W/images" \
    run_dir="$dir" steps="$steps" ${overrides[$i]} "$@"
}
if [ -z "${STEPS:-}" ]; then
  # bounded: a probe that stalls is stopped with SIGABRT, which makes Python print every thread's stack
  pids=()
  for i in "${!names[@]}"; do PYTHONFAULTHANDLER=1 PREFIX="timeout -s ABRT ${PROBE_TIMEOUT:-150}" \
    run "$i" 40 "$W/probe-${names[$i]}" log_every=1 save_every=0 > "$W/probe-${names[$i]}.log" 2>&1 & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || { tail -n 60 "$W"/probe-*.log; exit 1; }; done
  tail -n 3 "$W"/probe-*.log
  STEPS=$(python3 - "$W" "$BUDGET" "${names[@]}" <<'PY'
import json, sys, statistics
w, budget, names = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
worst = max(statistics.median(json.loads(l)["step_time_s"] for l in open(f"{w}/probe-{n}/metrics.jsonl").readlines()[10:])
            for n in names)
print(max(100, int(budget / worst) // 100 * 100))
PY
)
  say "probe: $STEPS steps fit ${BUDGET}s"
fi
for i in "${!names[@]}"; do
  run "$i" "$STEPS" "$W/run-${names[$i]}" > "$W/run-${names[$i]}.log" 2>&1 &
done
wait
say "trained"
for i in "${!names[@]}"; do
  n=${names[$i]}
  python3 tools/evaluate.py --real "$W/heldout_videos" --prompts-from-real "$NEVAL" --out "$W/eval-$n-videos" \
    --model "teacher25=$W/run-$n/export/model_ema:25:7.5" --model "teacher25_gi=$W/run-$n/export/model_ema:25:7.5:$GI" \
    --model "teacher1=$W/run-$n/export/model_ema:1:1" --cache-dir "$CACHE" > "$W/eval-$n-videos.log" 2>&1 &
  python3 tools/evaluate.py --real "$W/heldout_images" --prompts-from-real "$NEVAL" --out "$W/eval-$n-images" \
    --model "teacher25=$W/run-$n/export/model_ema:25:7.5" --model "teacher25_gi=$W/run-$n/export/model_ema:25:7.5:$GI" \
    --cache-dir "$CACHE" > "$W/eval-$n-images.log" 2>&1 &
done
wait
say "evaluated"
for n in "${names[@]}"; do
  mkdir -p "$W/pack/$n"
  cp "$W/run-$n/export/model_ema/config.json" "$W/run-$n/metrics.jsonl" "$W/run-$n.log" "$W/run-$n/config.yaml" "$W/pack/$n/"
  for s in videos images; do cp "$W/eval-$n-$s/metrics.json" "$W/pack/$n/eval-$s.json"; cp "$W/eval-$n-$s.log" "$W/pack/$n/"; \
    cp "$W/eval-$n-$s/metrics.md" "$W/pack/$n/eval-$s.md"; done
  split -b 15M -d "$W/run-$n/export/model_ema/model.safetensors" "$OUT/$n.safetensors.part"
  split -b 15M -d "$W/run-$n/export/model/model.safetensors" "$OUT/$n-raw.safetensors.part"
done
tar czf "$OUT/results.tgz" -C "$W/pack" .
say "done"
