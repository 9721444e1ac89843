#!/usr/bin/env bash
# The pipeline engine against the single-stage engines on GPU: the same APT image steps (random 2b weights,
# synthetic 1024px latents: 4096 visual + 512 text tokens, global batch 4, micro-batch 1, bf16, activation
# checkpointing) through `parallel.engine=torch`, `deepspeed` (ZeRO-3) and `pipeline` (pp = NGPU, megatron-core
# schedule). Prints each run's mean step time over the steps after the first, its peak memory, and the
# losses of the first step (the three engines must agree up to bf16 rounding).
#   bash benchmarks/gpu_pipeline_engine.sh OUT_DIR            # one GPU: pipeline engine with pp=1
#   NGPU=2 bash benchmarks/gpu_pipeline_engine.sh OUT_DIR     # two GPUs: pp=2 (and dp=2 for the others)
#   ENGINES="torch pipeline" STEPS=12 bash benchmarks/gpu_pipeline_engine.sh OUT_DIR
# Each run's checkpoint and export are deleted after it (2b G + D with optimizer state and EMA is ~40 GB); on
# a small disk the final save of a run can fail after its steps, whose metrics are already written.
set -euo pipefail
OUT="${1:?output folder}"; NGPU="${NGPU:-1}"; STEPS="${STEPS:-6}"; PRESET="${PRESET:-2b}"
SHAPE="${SHAPE:-[16,1,128,128]}"; TEXT="${TEXT:-512}"; PREC="${PREC:-bf16}"
mkdir -p "$OUT"
if [[ ! -f "$OUT/model/config.json" ]]; then
  python3 -c "from megatron_apt.models import build_mmdit; from megatron_apt.checkpoint.model_dir import save_mmdit; save_mmdit(build_mmdit('$PRESET', zero_init=False, seed=1), '$OUT/model')"
fi
COMMON=(stage=apt_image model.preset="$PRESET" "model.init=$OUT/model" "model.teacher=$OUT/model" data.synthetic=true
        "data.synthetic_shape=$SHAPE" data.synthetic_text_len="$TEXT" data.synthetic_size=16 steps="$STEPS"
        global_batch=4 micro_batch=1 precision="$PREC" parallel.activation_checkpointing=true log_every=1 save_every=0)
for eng in ${ENGINES:-torch deepspeed pipeline}; do
  extra=("parallel.engine=$eng")
  [[ "$eng" == pipeline ]] && extra+=("parallel.pp=$NGPU")
  rm -rf "$OUT/run_$eng"
  torchrun --standalone --nproc_per_node "$NGPU" pretrain_apt.py "${COMMON[@]}" "${extra[@]}" "run_dir=$OUT/run_$eng" \
    > "$OUT/log_$eng.txt" 2>&1 || { echo "$eng exited with an error:"; grep -v -i warn "$OUT/log_$eng.txt" | tail -3; }
  rm -rf "$OUT/run_$eng/checkpoints" "$OUT/run_$eng/export"
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = {}
for eng in ("torch", "deepspeed", "pipeline"):
    f = out / f"run_{eng}" / "metrics.jsonl"
    if not f.is_file():
        continue
    recs = [json.loads(l) for l in f.read_text().splitlines()]
    t = [r["step_time_s"] for r in recs[1:]]
    rows[eng] = (sum(t) / len(t), max(r["peak_mem_gb"] for r in recs), recs[0])
for eng, (t, mem, r0) in rows.items():
    print(f"{eng:10s} step {t:7.2f} s  peak {mem:6.1f} GB  first step d_loss {r0['d_loss']:.5f} g_loss {r0['g_loss']:.5f} "
          f"logit_gap {r0['logit_gap']:.5f}")
if "torch" in rows and "pipeline" in rows:
    print(f"pipeline / torch step time: {rows['pipeline'][0] / rows['torch'][0]:.3f}")
PY
