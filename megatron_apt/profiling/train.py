"""One training step of a stage on one device, through the project's own methods (megatron_apt.methods)
with plain torch engines: step time, model TFLOP/s, MFU, peak memory."""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch._dynamo.utils import counters

from megatron_apt.config.train import checkpointing
from megatron_apt.models import flops as mf
from megatron_apt.profiling.builders import build_backbone, random_text
from megatron_apt.profiling.shapes import resolve_shapes
from megatron_apt.profiling.timing import (
    free,
    kernel_breakdown,
    mem_peak_gib,
    mem_reset,
    mem_source,
    n_params,
    print_kernels,
    recompile_limit_hits,
    summary,
    time_fn,
)

# ------------------------------------------------------------------------------------------------------
# training steps
# ------------------------------------------------------------------------------------------------------
STAGE_OF = {"apt": "apt_video", "flow": "flow", "cd": "cd"}
PRECISION = {"autocast": "bf16 autocast: fp32 parameters, gradients and optimizer state, bf16 matmuls",
             "bf16": "bf16 parameters, gradients and optimizer state (no fp32 master copy)"}


def run_train_stage(stage: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One update of `stage` (apt: the paper's video stage, flow, cd) timed through the method the trainer runs
    (`megatron_apt.methods`), on plain torch engines, random weights and one random micro-batch."""
    from megatron_apt.config.model import DiscriminatorConfig, get_model_config
    from megatron_apt.config.train import load_config
    from megatron_apt.methods import METHODS, MethodContext
    from megatron_apt.models import Discriminator, OneStepGenerator
    from megatron_apt.parallel import ParallelDims, parallelize_mmdit
    from megatron_apt.parallel.execution import LocalExecutor
    from megatron_apt.trainer.engines import TorchEngine, make_optimizer

    cfg = get_model_config(args.preset)
    shapes = resolve_shapes(args, cfg)
    C, T, H, W = shapes["latent"]
    B, L = args.batch, args.text_len
    Lx = shapes["n_visual_tokens"]
    ac = checkpointing(not args.no_activation_checkpointing, getattr(args, "checkpoint_scope", "block"))
    precision = args.precision
    param_dtype = torch.float32 if precision == "autocast" else torch.bfloat16
    # the stage's own defaults (the paper's for APT), this micro-batch, this model; "random" marks the model
    # directories the builder below replaces with random weights
    tcfg = load_config(None, [f"stage={STAGE_OF[stage]}", "data.synthetic=true", f"global_batch={B}",
                              f"micro_batch={B}", f"model.preset={args.preset}", "model.init=random",
                              "model.teacher=random", f"optim.lr={args.lr}",
                              f"precision={'bf16' if precision == 'autocast' else 'fp32'}"])
    seeds = iter(range(args.seed, args.seed + 100))

    def build(kind, path, *, dcfg=None, head_seed=None):
        backbone = build_backbone(args.preset, device, param_dtype, next(seeds))
        if kind == "generator":
            model = OneStepGenerator(backbone)
        elif kind == "discriminator":
            with torch.device(device):  # the new heads, on the device with the backbone
                model = Discriminator(backbone, dcfg or DiscriminatorConfig())
            model.init_heads(generator=torch.Generator(device=device).manual_seed(head_seed or 0))
            model = model.to(param_dtype)
        else:
            model = backbone
        if ac or args.compile:
            heads = list(model.heads) if kind == "discriminator" else ()
            parallelize_mmdit(model, ParallelDims(), activation_checkpointing=ac, compile=args.compile,
                              extra_blocks=heads)
        return model

    def engine(module, lr):
        o = tcfg.optim
        opt = make_optimizer(module.parameters(), o.optimizer, lr, o.alpha, o.eps, o.weight_decay, o.betas)
        return TorchEngine(module, opt, grad_clip=0.0, precision=tcfg.precision)

    mem_reset(device)
    ctx = MethodContext(cfg=tcfg, device=device, executor=LocalExecutor(), build=build, engine=engine,
                        loss_scale=1.0 / B, global_mean=lambda total, n: total / max(n, 1e-12),
                        encode_prompt=lambda text: None)
    method = METHODS[tcfg.stage](ctx)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x0 = torch.randn(B, C, T, H, W, generator=gen, device=device).to(param_dtype)
    text, mask = random_text(B, L, cfg.text_dim, args.text_valid, device, param_dtype, gen)
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
    mbs = [{"x": x0, "text": text, "text_mask": mask, "positions": list(range(B)), "weight": 1.0}]
    params = {name: n_params(e.module) for name, e in method.engines().items()}
    optimizer = {"rmsprop": f"RMSprop(alpha={tcfg.optim.alpha})", "adam": f"Adam(betas=(0, {tcfg.optim.alpha}))",
                 "adamw": f"AdamW(betas={tuple(tcfg.optim.betas)})"}[tcfg.optim.optimizer]
    if stage == "apt":
        dcfg = DiscriminatorConfig()
        flops = mf.apt_step_flops(cfg, B, Lx, L, dcfg, activation_checkpointing=ac, use_r1=tcfg.apt.use_r1)
    elif stage == "flow":
        flops = mf.flow_matching_step_flops(cfg, B, Lx, L, activation_checkpointing=ac)
    else:
        flops = mf.consistency_step_flops(cfg, B, Lx, L, activation_checkpointing=ac)
    resident_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    last: dict[str, float] = {}
    step_no = iter(range(10**9))

    graphs_at_timing: list[int] = []
    limit_hits_before = recompile_limit_hits()

    def timed_step():
        i = next(step_no)
        if i == args.warmup:  # the first timed step: every compile after this one is a steady-state recompile
            graphs_at_timing.append(counters["stats"]["unique_graphs"])
        last.update(method.train_step(i, mbs))

    mem_reset(device)
    times = time_fn(timed_step, args.warmup, args.iters, device)
    recompiles = counters["stats"]["unique_graphs"] - graphs_at_timing[0] if graphs_at_timing else None
    limit_hit = recompile_limit_hits() > limit_hits_before
    kernels = kernel_breakdown(timed_step, device, args.kernels) if args.kernels else None
    s = summary(times)
    peak = mem_peak_gib(device)
    losses = {k: float(v) for k, v in last.items() if k.endswith("loss") or k == "ar1"}
    if "g_loss" in losses:
        losses.pop("loss")  # APT reports G's loss as its step loss too
    rep = mf.mfu_report(flops.model, s["seconds"], device, peak=args.peak_tflops * 1e12 if args.peak_tflops else None,
                        measured_peak=args.measured_peak_tflops * 1e12)
    return {
        "stage": stage,
        "step_time_s": s["seconds"], "step_time_min_s": s["seconds_min"], "step_times_s": s["seconds_all"],
        "samples_per_s": B / s["seconds"],
        "flops_per_step": flops.model, "hardware_flops_per_step": flops.hardware, "flops": flops.to_dict(),
        "model_tflops_per_s": rep["tflops_per_s"], "hardware_tflops_per_s": flops.hardware / s["seconds"] / 1e12,
        "mfu_datasheet": rep["mfu_datasheet"], "mfu_measured": rep["mfu_measured"],
        "peak_tflops_datasheet": rep["peak_tflops_datasheet"], "peak_source": rep["peak_source"],
        "peak_tflops_measured": rep["peak_tflops_measured"],
        "peak_mem_gib": peak, "resident_after_build_gib": resident_gib,
        "params": params, "losses": losses, "graphs_compiled_while_timed": recompiles,
        "recompile_limit_hit": limit_hit, "kernels": kernels, "losses_finite": all(math.isfinite(v) for v in losses.values()),
        "optimizer": optimizer, "precision": PRECISION[precision],
        "config": {"preset": args.preset, "latent": shapes["latent"], "n_visual_tokens": Lx, "text_len": L,
                   "text_valid": args.text_valid, "micro_batch": B, "activation_checkpointing": bool(ac),
                   "checkpoint_scope": ac or None,
                   "compile": args.compile, "cudnn_benchmark": args.cudnn_benchmark, "attn_backend": args.attn_backend, "lr": args.lr,
                   "warmup": args.warmup, "iters": args.iters, "resolution": [shapes["width"], shapes["height"]],
                   "frames": shapes["frames"], "method": type(method).__name__},
    }


def run_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    stages = args.stages
    out: dict[str, Any] = {"mode": "train", "mem_source": mem_source(device), "stages": {}}
    for st in stages:
        out["stages"][st] = run_train_stage(st, args, device)
        free(device)
    return out


def print_train(res: dict[str, Any]) -> None:
    for st, r in res["stages"].items():
        c = r["config"]
        print(f"\ntrain stage={st}  preset={c['preset']}  latent {'x'.join(map(str, c['latent']))} "
              f"({c['n_visual_tokens']} visual + {c['text_len']} text tokens)  micro-batch {c['micro_batch']}  "
              f"activation checkpointing={c['activation_checkpointing']}"
              + (f" ({c['checkpoint_scope']})" if c.get("checkpoint_scope") else "") + f"  compile={c['compile']}")
        print(f"  precision: {r['precision']};  optimizer: {r['optimizer']}")
        print(f"  step {r['step_time_s']:.3f} s (min {r['step_time_min_s']:.3f})  {r['samples_per_s']:.3f} samples/s  "
              f"{r['flops_per_step'] / 1e12:.1f} model TFLOP/step ({r['flops']['forward_equivalents']:.2f} forwards)")
        print(f"  model {r['model_tflops_per_s']:.1f} TFLOP/s (hardware, with recompute, "
              f"{r['hardware_tflops_per_s']:.1f})  MFU {r['mfu_datasheet']:.1%} of {r['peak_tflops_datasheet']:.0f} "
              f"({r['peak_source']}), {r['mfu_measured']:.1%} of measured {r['peak_tflops_measured']:.0f}")
        print(f"  peak memory {r['peak_mem_gib']:.2f} GiB  losses {r['losses']}"
              + ("" if r["losses_finite"] else "  (non-finite: random weights in bf16; timing is unaffected)"))
        if r.get("kernels"):
            print_kernels(r["kernels"], "one more step")
        if c["compile"]:
            print(f"  graphs compiled during the timed steps (steady-state recompiles): "
                  f"{r['graphs_compiled_while_timed']}"
                  + ("; dynamo hit its recompile limit: some blocks ran eagerly" if r["recompile_limit_hit"] else ""))
