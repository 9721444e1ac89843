"""Will a training stage fit, and how long will an update take? Per-GPU memory and step time of a layout.

Builds the stage's networks on the meta device and prints, per GPU: ZeRO-3 parameter shards and the gathered
working set, gradient shards and buckets, fp32 master weights, optimizer state, EMA, the cd teacher, and
activations at the real sequence lengths (the model is documented in megatron_apt/planning/__init__.py); the exact
global-batch arithmetic; and an estimated update time from the measured single-GPU training rate plus
ZeRO-3 / tensor / sequence-parallel traffic. A layout that does not fit is refused (exit status 1) with the
fastest layouts that do (searched over tp, sp in {1, 2, 4, 8} and the micro-batch; among those within 2% of
the fastest, the one with the most headroom).

  python tools/plan.py --stage apt_image --gpus 256                          # the paper's image stage
  python tools/plan.py --stage apt_video --gpus 1024 --micro-batch 2         # refused: prints what fits
  python tools/plan.py --config examples/configs/apt_video_8b.yaml --gpus 1024 parallel.sp=2
  python tools/plan.py --stage apt_image --gpus 256 --search                 # the best layouts that fit
  python tools/plan.py --stage apt_video --gpus 1024 --engine pipeline --pp 4 --tp 2   # pipeline stages

With --engine pipeline (parallel.engine=pipeline) the plan is per pipeline stage: whole fp32 parameters per
stage, ZeRO-1 optimizer state over data parallel, 1F1B activations in flight; the report shows the heaviest
stage, the bubble and the stage-to-stage traffic. --search (and the suggestions of a refused layout) then
also tries pp in {2, 4, 8}; without it they stay with pp = 1.

Assumptions (flags change them): H100 80 GB (79.6 GiB as nvidia-smi reports it); 364 model TFLOP/s per GPU
(the 2b APT step measured on one H200, assumed for the H100: same 989 TFLOP/s datasheet bf16 peak);
40 GB/s per GPU between nodes, 300 GB/s inside a node.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from megatron_apt import planning as P
from megatron_apt.config.train import CHECKPOINT_SCOPES
from megatron_apt.utils import cli_main

# Stages without a batch in the paper (cd, flow) are planned at the video stage's 2048.
UNSTATED_BATCH = 2048


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a training YAML (examples/configs/*.yaml): stage, preset, batch and layout")
    p.add_argument("overrides", nargs="*", help="dotted overrides of --config, e.g. parallel.sp=2 micro_batch=1")
    p.add_argument("--stage", choices=P.STAGES, help="without --config (default apt_image)")
    p.add_argument("--preset", default=None, help="model preset (default 8b)")
    p.add_argument("--gpus", type=int, required=True, help="world size")
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--sp", type=int, default=None)
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (> 1 needs --engine pipeline)")
    p.add_argument("--pipeline-layers", default=None,
                   help="blocks per pipeline stage of G / flow / cd models, comma-separated (default: even)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=None, help="default: the paper's (9062 images, 2048 videos)")
    p.add_argument("--steps", type=int, default=None, help="updates, for the total time (default: the paper's)")
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--checkpoint-scope", choices=list(CHECKPOINT_SCOPES), default=None,
                   help="what activation checkpointing recomputes: whole blocks, only their MLPs, or all but the attention kernel")
    p.add_argument("--engine", choices=["deepspeed", "torch", "pipeline"], default=None)
    p.add_argument("--optimizer", choices=["rmsprop", "adam", "adamw"], default=None)
    p.add_argument("--sample", choices=["image", "video"], default=None,
                   help="sample kind (default: image for apt_image, video otherwise)")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--video-size", default="1280x720", help="WIDTHxHEIGHT")
    p.add_argument("--video-seconds", type=float, default=2.0)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--gpu-mem-gib", type=float, default=P.H100_80GB_GIB, help="usable GPU memory (default H100 80GB)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tflops", type=float, default=P.MEASURED_TRAIN_TFLOPS,
                   help="measured model TFLOP/s per GPU of a training step")
    p.add_argument("--inter-node-gbps", type=float, default=P.INTER_NODE_GBPS)
    p.add_argument("--intra-node-gbps", type=float, default=P.INTRA_NODE_GBPS)
    p.add_argument("--search", action="store_true", help="also list the fastest layouts that fit")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the report")
    return p


def make_request(a: argparse.Namespace) -> P.PlanRequest:
    if a.config:
        from megatron_apt.config.train import load_config

        # the planner needs no data: a placeholder satisfies the config's data check
        cfg = load_config(a.config, ["data.synthetic=true", *a.overrides])
        req = P.request_from_config(cfg, a.gpus)
    else:
        if a.overrides:
            raise ValueError("dotted overrides need --config")
        stage = a.stage or "apt_image"
        from megatron_apt.config.train import stage_defaults

        paper = stage_defaults(stage)
        req = P.PlanRequest(stage=stage, world=a.gpus, global_batch=paper.get("global_batch", UNSTATED_BATCH),
                            steps=paper.get("steps"), optimizer=paper.get("optim.optimizer", "rmsprop"))
    if a.stage and a.config and a.stage != req.stage:
        raise ValueError(f"--stage {a.stage} contradicts the config's stage {req.stage}")
    kw = {}
    for name, key in (("preset", "preset"), ("tp", "tp"), ("sp", "sp"), ("pp", "pp"), ("micro_batch", "micro_batch"),
                      ("global_batch", "global_batch"), ("steps", "steps"), ("engine", "engine"),
                      ("optimizer", "optimizer")):
        v = getattr(a, name)
        if v is not None:
            kw[key] = v
    if a.pipeline_layers:
        kw["pipeline_layers"] = tuple(int(n) for n in a.pipeline_layers.split(","))
    if a.no_activation_checkpointing:
        kw["activation_checkpointing"] = False
    elif a.checkpoint_scope is not None:
        kw["activation_checkpointing"] = a.checkpoint_scope
    req = dataclasses.replace(req, world=a.gpus, gpu_mem_gib=a.gpu_mem_gib, gpus_per_node=a.gpus_per_node,
                              tflops=a.tflops, inter_node_gbps=a.inter_node_gbps,
                              intra_node_gbps=a.intra_node_gbps, **kw)
    cfg = req.model_config()
    kind = a.sample or ("image" if req.stage == "apt_image" else "video")
    if kind == "image":
        sample = P.image_sample(cfg, a.image_size, a.text_tokens)
    else:
        w, h = (int(v) for v in a.video_size.lower().split("x"))
        sample = P.video_sample(cfg, w, h, a.video_seconds, a.fps, a.text_tokens)
    return dataclasses.replace(req, sample=sample)


def summary(plan: P.Plan) -> dict:
    r = plan.request
    return {"stage": r.stage, "preset": r.preset, "world": r.world, "engine": r.engine, "tp": r.tp, "sp": r.sp,
            "pp": r.pp, "dp": plan.dims.dp,
            "micro_batch": r.micro_batch, "global_batch": r.global_batch, "counts": sorted(set(plan.batch.counts)),
            "micro_steps": plan.batch.micro_steps, "visual_tokens": plan.sample.n_visual,
            "text_tokens": plan.sample.n_text, "peak_gib": round(plan.total_gib, 3), "fits": plan.fits,
            "gpu_mem_gib": r.gpu_mem_gib, "peak_phase": plan.memory.peak_phase.name,
            "static_gib": {i.label: round(i.bytes / P.GIB, 4) for i in plan.memory.static},
            "heaviest_stage": plan.heaviest_stage.index if plan.stages else None,
            "bubble_fraction": round(plan.time.bubble_fraction, 4), "update_s": round(plan.time.per_update_s, 2),
            "total_h": None if plan.time.total_hours is None else round(plan.time.total_hours, 2)}


@cli_main  # an OSError (permission, a missing folder, a full disk): one line naming the path, status 2
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        req = make_request(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pps = (1, 2, 4, 8) if req.engine == "pipeline" else (1,)  # pipeline layouts only when asked for
    try:
        plan = P.make_plan(req)
    except P.LayoutError as e:  # a layout that cannot run at all
        print(f"error: {e}", file=sys.stderr)
        best = P.search(req, pps=pps)
        if best is not None:
            print(f"a layout that runs and fits: {P.describe_layout(best)} "
                  f"({best.total_gib:.1f} GiB, {best.time.per_update_s:.0f} s per update)", file=sys.stderr)
        return 2
    fitting = P.candidates(req, pps=pps) if (a.search or not plan.fits) else []
    if a.json:
        out = {"plan": summary(plan), "suggested": [summary(p) for p in fitting[:5]]}
        print(json.dumps(out, indent=2))
        return 0 if plan.fits else 1
    print(P.format_plan(plan))
    if not plan.fits:
        ph = plan.memory.peak_phase
        big = max(ph.items, key=lambda i: i.bytes)
        print(f"\nREFUSED: this layout needs about {plan.total_gib:.1f} GiB per GPU, more than the "
              f"{req.gpu_mem_gib:.1f} GiB available (peak in phase '{ph.name}', largest part: {big.label}, "
              f"{big.bytes / P.GIB:.1f} GiB).")
        if fitting:
            best = fitting[0]
            print(f"suggested: {P.describe_layout(best)}  -> {best.total_gib:.1f} GiB, "
                  f"{best.time.per_update_s:.1f} s per update "
                  "(the fastest that fit, within 2%, with the most headroom)")
            print(f"  as config overrides: {P.config_overrides(best)}")
            print()
            print(P.format_plan(best))
        else:
            dims = "tp, pp in {1, 2, 4, 8}" if req.engine == "pipeline" else "tp, sp in {1, 2, 4, 8}"
            print(f"no layout with {dims} and micro-batch >= 1 fits: use more GPUs per sample "
                  "or shorter sequences")
        return 1
    if fitting:
        print("\nlayouts that fit (within 2% of the fastest first, least memory first; then by time):")
        for p in fitting[:6]:
            print(f"  {P.describe_layout(p):<58s} {p.total_gib:6.1f} GiB  {p.time.per_update_s:8.1f} s per update")
    return 0


if __name__ == "__main__":
    sys.exit(main())
