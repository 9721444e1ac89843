#!/usr/bin/env bash
# The real trainer (pretrain_apt.py) through each engine users run, side by side: the same APT image-stage
# steps (random 2b weights, synthetic latents, bf16, activation checkpointing) through `parallel.engine=torch`,
# `deepspeed` (ZeRO-3) and `pipeline` (pp = NGPU, megatron-core schedule), for each shape, next to the
# profiler's prediction for the same shape (tools/profile_throughput.py --mode train, the same methods in a
# bare loop). Prints, per shape and engine: the mean step time over the steps after the first SKIP (default 1;
# pass SKIP=2 with compile and TEXT_FIXED=false: the second step compiles again where the text length
# changes), model TFLOP/s and MFU (the trainer's own, of 989), peak memory, the first step's losses (the
# engines must agree up to bf16 rounding) and the ratio to the torch engine and to the profiler. The table goes to OUT/engines.md too.
#
#   bash benchmarks/gpu_pipeline_engine.sh OUT_DIR                 # both shapes, three engines, one GPU
#   SHAPES="image" ENGINES="torch pipeline" STEPS=12 bash benchmarks/gpu_pipeline_engine.sh OUT_DIR
#   NGPU=2 bash benchmarks/gpu_pipeline_engine.sh OUT_DIR          # two GPUs: pp=2 (dp=2 for the others)
#   EXTRA="parallel.checkpoint_scope=attention parallel.compile=true" \
#     PROFILE_ARGS="--checkpoint-scope attention --compile" bash benchmarks/gpu_pipeline_engine.sh OUT_DIR
#
# EXTRA holds trainer overrides; PROFILE_ARGS the profiler's options for the same settings (its prediction is
# of the configuration it is given, whole-block checkpointing and no compile by default) and PROFILE_WARMUP its
# untimed steps (default 1; 2 with compile). A profile is reused only if it was made with the same options.
#
# Captions: every synthetic caption is TEXT (default 512) tokens, as in the profiler's step (TEXT_FIXED=true, the
# default since the fourth GPU session); TEXT_FIXED=false draws each caption's length from 1..TEXT (padding masks,
# another text size per micro-batch, so a compiled trainer compiles more sizes than the profiler).
#
# Shapes (SHAPES, a space-separated subset): image = 1024px, latent [16,1,128,128] (4096 visual + 512 text
# tokens) at micro-batch IMAGE_MB (default 4), global batch 4 x IMAGE_MB; video = 2 s 720p, latent
# [16,13,90,160] (46,800 visual tokens) at micro-batch 1, global batch 1. A finished (shape, engine) run is
# skipped when the command is run again, so the table can be filled over several commands (whatever EXTRA or
# TEXT_FIXED were then: give a fresh OUT to change them). IMAGE_LATENT and
# VIDEO_LATENT replace the latents (a CPU smoke run: PRESET=debug IMAGE_LATENT=[4,1,8,8] VIDEO_LATENT=[4,2,8,8]). Each run's
# steps are timed without a final checkpoint or export (save_final=false: 2b G + D with optimizer state is ~40 GB).
set -euo pipefail
OUT="${1:?output folder}"; NGPU="${NGPU:-1}"; STEPS="${STEPS:-6}"; PRESET="${PRESET:-2b}"; SKIP="${SKIP:-1}"
TEXT="${TEXT:-512}"; TEXT_FIXED="${TEXT_FIXED:-true}"; PREC="${PREC:-bf16}"; IMAGE_MB="${IMAGE_MB:-4}"
mkdir -p "$OUT"
if [[ ! -f "$OUT/ghat/config.json" ]]; then  # one random backbone as the teacher (D's start) and as G-hat (G's)
  python3 -c "from megatron_apt.models import build_mmdit; from megatron_apt.checkpoint.model_dir import save_mmdit
m = build_mmdit('$PRESET', zero_init=False, seed=1)
save_mmdit(m, '$OUT/teacher', kind='diffusion'); save_mmdit(m, '$OUT/ghat', kind='consistency')"
fi
shape_args() {  # shape -> "latent micro global"
  case "$1" in
    image) echo "${IMAGE_LATENT:-[16,1,128,128]} $IMAGE_MB $(( 4 * IMAGE_MB ))" ;;
    video) echo "${VIDEO_LATENT:-[16,13,90,160]} 1 1" ;;
    *) echo "unknown shape $1 (image, video)" >&2; return 2 ;;
  esac
}
for shape in ${SHAPES:-image video}; do
  read -r latent mb gb <<< "$(shape_args "$shape")"
  # the profiler's prediction: the same model, shape and micro-batch in a bare loop (one process, one GPU)
  lat="${latent//[\[\]]/}"; lat="${lat//,/x}"
  pargs="--mode train --stage apt --preset $PRESET --latent $lat --text-len $TEXT --micro-batch $mb \
--warmup ${PROFILE_WARMUP:-1} --iters 3 ${PROFILE_ARGS:-}"
  if [[ ! -f "$OUT/profile_$shape.json" || "$(cat "$OUT/profile_$shape.args" 2>/dev/null)" != "$pargs" ]]; then
    rm -f "$OUT/profile_$shape.json" "$OUT/profile_$shape.args"
    # shellcheck disable=SC2086  # the options are words
    python3 tools/profile_throughput.py $pargs --json "$OUT/profile_$shape.json" > "$OUT/profile_$shape.txt" 2>&1 \
      && echo "$pargs" > "$OUT/profile_$shape.args" \
      || { echo "profiler ($shape) failed:"; tail -n 3 "$OUT/profile_$shape.txt"; }
  fi
  COMMON=(stage=apt_image model.preset="$PRESET" "model.init=$OUT/ghat" "model.teacher=$OUT/teacher" data.synthetic=true
          "data.synthetic_shape=$latent" data.synthetic_text_len="$TEXT" data.synthetic_fixed_text_len="$TEXT_FIXED"
          data.synthetic_size=16 steps="$STEPS"
          global_batch="$gb" micro_batch="$mb" precision="$PREC" parallel.activation_checkpointing=true log_every=1
          save_every=0 save_final=false)
  for eng in ${ENGINES:-torch deepspeed pipeline}; do
    run="$OUT/run_${shape}_$eng"
    [[ -f "$run/done" ]] && continue
    extra=("parallel.engine=$eng")
    [[ "$eng" == pipeline ]] && extra+=("parallel.pp=$NGPU")
    rm -rf "$run"
    # shellcheck disable=SC2086  # EXTRA is a list of overrides separated by spaces
    torchrun --standalone --nproc_per_node "$NGPU" pretrain_apt.py "${COMMON[@]}" "${extra[@]}" ${EXTRA:-} \
      "run_dir=$run" > "$OUT/log_${shape}_$eng.txt" 2>&1 || \
      { echo "$shape/$eng exited with an error:"; grep -v -i warn "$OUT/log_${shape}_$eng.txt" | tail -3; }
    rm -rf "$run/checkpoints" "$run/export"
    [[ -f "$run/metrics.jsonl" ]] && touch "$run/done"
  done
done
python3 - "$OUT" "${SHAPES:-image video}" "$NGPU" "$SKIP" <<'PY'
import json, sys, pathlib
import yaml
out, shapes, ngpu, skip = pathlib.Path(sys.argv[1]), sys.argv[2].split(), int(sys.argv[3]), int(sys.argv[4])
# The profiler times one micro-batch on one GPU. A trainer step on NGPU GPUs does global / micro of them,
# spread over the GPUs (data-parallel ranks, or pipeline stages that each run 1/NGPU of every micro-batch; the
# pipeline's fill and drain not counted), so the prediction ("pred s") is the profiler's step x global / (micro
# x NGPU), and "/ profiler" is the trainer's step over it.
lines = ["| shape | engine | step s | pred s | model TFLOP/s | MFU | peak GiB | first d_loss | first g_loss | / torch "
         "| / profiler |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for shape in shapes:
    prof = None
    pf = out / f"profile_{shape}.json"
    if pf.is_file():
        r = json.loads(pf.read_text())["stages"]["apt"]
        prof = r["step_time_s"]
        lines.append(f"| {shape} | profiler, 1 micro-batch | {prof:.2f} | | {r['model_tflops_per_s']:.3g} | "
                     f"{r['mfu_datasheet']:.1%} | "
                     f"{r.get('peak_mem_gib', float('nan')):.1f} | {r['losses'].get('d_loss', float('nan')):.5f} | "
                     f"{r['losses'].get('g_loss', float('nan')):.5f} | | |")
    torch_t = None
    for eng in ("torch", "deepspeed", "pipeline"):
        f = out / f"run_{shape}_{eng}" / "metrics.jsonl"
        if not f.is_file():
            continue
        recs = [json.loads(l) for l in f.read_text().splitlines()]
        later = recs[skip:] or recs
        def mean(k):  # None where the trainer could not compute it (MFU on a CPU: no known peak)
            vals = [r.get(k) for r in later]
            return None if None in vals else sum(vals) / len(vals)

        fmt = lambda v, spec: "–" if v is None else format(v, spec)
        t = mean("step_time_s")
        torch_t = t if eng == "torch" else torch_t
        r0 = recs[0]
        cfg = yaml.safe_load((f.parent / "config.yaml").read_text())
        pred = prof * cfg["global_batch"] / cfg["micro_batch"] / ngpu if prof else None
        lines.append(f"| {shape} | {eng} | {t:.2f} | {fmt(pred, '.2f')} | {fmt(mean('tflops'), '.3g')} | "
                     f"{fmt(mean('mfu'), '.1%')} | {max(r['peak_mem_gb'] for r in recs):.1f} | {r0['d_loss']:.5f} | "
                     f"{r0['g_loss']:.5f} | " + (f"{t / torch_t:.2f}x | " if torch_t else "| ")
                     + (f"{t / pred:.2f}x |" if pred else "|"))
text = "\n".join(lines)
print(text)
(out / "engines.md").write_text(text + "\n")
PY
