"""Throughput of one-step video generation (the paper's Table 7) and of the training step of each stage.

  --mode inference  text encoder (UMT5-XXL shape) + DiT (one-step generator) + VAE (Wan2.1 shape) decode,
                    seconds per component, the DiT's achieved TFLOP/s and MFU, peak memory; with --sp N
                    under torchrun the DiT runs Ulysses sequence parallel and its scaling efficiency is
                    reported against the 1-GPU time (measured on rank 0 first, or given).
  --mode train      one training step of a stage (apt, flow, cd, a comma list or all) on one device: samples/s, step
                    time, model TFLOP/s, MFU against the datasheet and the measured dense-matmul ceiling,
                    peak memory. Plain torch optimizers: this measures the model math, not the DeepSpeed
                    engines of the trainer.

Every model has random weights (nothing is downloaded). Model FLOPs come from megatron_apt.models.flops.
--smoke shrinks everything (debug preset, a tiny latent, tiny UMT5 and Wan VAE configs) so both modes run
on a CPU in seconds.

  python tools/profile_throughput.py --mode inference --preset 8b --resolution 1280x720 --seconds 2 --fps 24
  python tools/profile_throughput.py --mode train --stage apt --preset 2b --latent 16x13x90x160
  torchrun --nproc_per_node 4 tools/profile_throughput.py --mode inference --sp 4 --components dit
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from megatron_apt.config.train import ATTENTION_BACKENDS
from megatron_apt.models import flops as mf
from megatron_apt.utils import cli_main

# ------------------------------------------------------------------------------------------------------
# fixed shapes
# ------------------------------------------------------------------------------------------------------
# UMT5-XXL (the encoder of Wan2.1 / the 4096-wide text states the 8b MMDiT reads)
UMT5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 256384,
            "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}
# Wan2.1's VAE is diffusers' AutoencoderKLWan() default config: temporal factor 4 (first frame kept),
# spatial factor 8, 16 latent channels
WAN21_VAE: dict[str, Any] = {}
VAE_TEMPORAL, VAE_SPATIAL = 4, 8

# --smoke: tiny shapes that keep every code path (the tiny VAE keeps the 4 x 8 x 8 compression)
SMOKE_UMT5 = {"d_model": 24, "d_kv": 6, "d_ff": 48, "num_layers": 2, "num_heads": 4, "vocab_size": 128,
              "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}
SMOKE_VAE = {"base_dim": 4, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
SMOKE_TILING = {"tile_sample_min_height": 16, "tile_sample_min_width": 16, "tile_sample_stride_height": 16,
                "tile_sample_stride_width": 16}

# Table 7 of the paper (H100s): one-step 1280x720, 24 fps, 2 s
PAPER_TABLE7_H100 = {
    "1": {"text_encoder": 0.28, "dit": 2.65, "vae": 3.10, "total": 6.03},
    "4": {"text_encoder": 0.28, "dit": 0.73, "vae": 1.19, "total": 2.20},
    "8": {"text_encoder": 0.28, "dit": 0.50, "vae": 1.19, "total": 1.97},
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def log(*a: Any) -> None:
    if _RANK == 0:
        print(*a, flush=True)


_RANK = 0


# ------------------------------------------------------------------------------------------------------
# shapes from the command line
# ------------------------------------------------------------------------------------------------------
def parse_pair(text: str, what: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{what} must look like WIDTHxHEIGHT (e.g. 1280x720), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{what} must be positive, got {text!r}")
    return w, h


def parse_latent(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) <= 0:
        raise ValueError(f"--latent must be CxTxHxW with positive sizes (e.g. 16x13x90x160), got {text!r}")
    return dims  # type: ignore[return-value]


def video_to_latent(width: int, height: int, frames: int, channels: int, patch: tuple[int, int, int],
                    temporal: int = VAE_TEMPORAL, spatial: int = VAE_SPATIAL) -> tuple[int, int, int, int]:
    """Latent (C, T, H, W) of a Wan2.1-shaped VAE for a video of `frames` frames at width x height, checked
    against the VAE factors and the DiT's patch size."""
    pt, ph, pw = patch
    fh, fw = spatial * ph, spatial * pw
    if height % fh or width % fw:
        def near(v, f):
            lo = v // f * f
            return lo if v - lo < f / 2 and lo > 0 else lo + f

        raise ValueError(
            f"resolution {width}x{height} is not divisible by the VAE x patch factors (VAE spatial {spatial} x patch "
            f"{pw} = {fw} across, {spatial} x {ph} = {fh} down); nearest valid: {near(width, fw)}x{near(height, fh)}")
    if frames < 1 or (frames - 1) % temporal:
        lo = max(1, (frames - 1) // temporal * temporal + 1)
        raise ValueError(
            f"{frames} frames do not fit the VAE's causal temporal factor {temporal} (frames = 1 + {temporal} k, the "
            f"first frame kept); nearest valid: {lo} or {lo + temporal}")
    t = (frames - 1) // temporal + 1
    if t % pt:
        raise ValueError(f"{t} latent frames are not divisible by the temporal patch {pt}")
    return channels, t, height // spatial, width // spatial


def resolve_shapes(args: argparse.Namespace, cfg) -> dict[str, Any]:
    if args.latent:
        C, T, H, W = parse_latent(args.latent)
        if C != cfg.in_channels:
            raise ValueError(f"--latent has {C} channels but preset {args.preset!r} expects {cfg.in_channels}")
        pt, ph, pw = cfg.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent {T}x{H}x{W} is not divisible by the patch size {pt}x{ph}x{pw}")
        width, height, frames = W * VAE_SPATIAL, H * VAE_SPATIAL, (T - 1) * VAE_TEMPORAL + 1
    else:
        width, height = parse_pair(args.resolution, "--resolution")
        if args.frames is not None:
            frames = args.frames
        else:
            n = args.seconds * args.fps
            if abs(n - round(n)) > 1e-6:
                raise ValueError(f"--seconds x --fps = {n} is not a whole number of frames")
            frames = round(n) + 1  # 2 s at 24 fps: 48 frames + the kept first frame = 49
        C, T, H, W = video_to_latent(width, height, frames, cfg.in_channels, cfg.patch_size)
    n_visual = mf.visual_tokens(cfg, (T, H, W))
    return {"latent": [C, T, H, W], "width": width, "height": height, "frames": frames, "n_visual_tokens": n_visual}


# ------------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device, group=None) -> list[float]:
    """Seconds of each timed call (CUDA events on a GPU); under a process group every call starts after a
    barrier and each call's time is the slowest rank's."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group=group)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    if group is not None:
        t = torch.tensor(times, dtype=torch.float64, device=device if dist.get_backend(group) == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times = t.tolist()
    return times


def mem_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def mem_peak_gib(device: torch.device) -> float:
    """Peak allocated device memory since the last reset; on a CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def mem_source(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "host peak RSS (ru_maxrss, never reset)"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def summary(times: list[float]) -> dict[str, Any]:
    return {"seconds": sum(times) / len(times), "seconds_min": min(times), "seconds_all": times}


def free(device: torch.device) -> None:
    """Return the memory of deleted models to the device (a full gc pass costs seconds on a CPU after the
    transformers/diffusers imports, and frees nothing there that reference counting has not)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------
# model builders (random weights, built on the target device)
# ------------------------------------------------------------------------------------------------------
def build_text_encoder(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int,
                       attn_implementation: str):
    """transformers' UMT5EncoderModel, random weights: built on the meta device, materialised directly on
    `device` in `dtype` (no CPU initialisation of ~5.7 B parameters), filled in place."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**shape, attn_implementation=attn_implementation)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.encoder.embed_tokens.weight = model.shared.weight  # to_empty unties them
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMS layer norms
                p.fill_(1.0)
            elif "relative_attention_bias" in name or name.endswith(("shared.weight", "embed_tokens.weight")):
                p.normal_(0.0, 1.0, generator=gen)
            else:  # Linear [out, in]: unit-variance outputs for unit-variance inputs
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    return model.eval().requires_grad_(False)


def build_vae(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKLWan(**shape)
    return vae.to(dtype=dtype).eval().requires_grad_(False)


def build_backbone(preset: str, device: torch.device, dtype: torch.dtype, seed: int):
    from megatron_apt.models import build_mmdit

    # zero_init=False: adaLN-Zero would leave gates and the output projection at zero, and tensor cores run
    # measurably faster on zeros (GUIDE.md: 894 vs 788 TFLOP/s on an 8192^3 matmul)
    return build_mmdit(preset, device=device, dtype=dtype, seed=seed, zero_init=False)


def random_text(B: int, L: int, dim: int, valid: int | None, device, dtype, gen):
    text = torch.randn(B, L, dim, generator=gen, device=device).to(dtype)
    mask = None
    if valid is not None and valid < L:
        mask = torch.zeros(B, L, dtype=torch.bool, device=device)
        mask[:, :valid] = True
        text = text * mask[..., None]
    return text, mask


# ------------------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------------------
def run_inference(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import torch.distributed as dist

    from megatron_apt.config.model import get_model_config
    from megatron_apt.models import OneStepGenerator
    from megatron_apt.parallel import ParallelDims, parallelize_mmdit

    cfg = get_model_config(args.preset)
    shapes = resolve_shapes(args, cfg)
    C, T, H, W = shapes["latent"]
    B, L = args.batch, args.text_len
    comps = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = set(comps) - {"text", "dit", "vae"}
    if unknown or not comps:
        raise ValueError(f"--components takes a comma list of text, dit, vae; got {args.components!r}")
    sp = args.sp
    group = None
    if sp > 1:
        from megatron_apt.parallel.state import sp_group

        group = sp_group()
    rank0 = _RANK == 0
    te_shape = SMOKE_UMT5 if args.smoke else UMT5_XXL
    vae_shape = SMOKE_VAE if args.smoke else WAN21_VAE
    vae_dtype = DTYPES[args.vae_dtype] if args.vae_dtype else dtype
    out: dict[str, Any] = {
        "mode": "inference",
        "config": {
            "preset": args.preset, "model": cfg.to_dict(), "batch": B, "text_len": L, "text_valid": args.text_valid,
            "resolution": [shapes["width"], shapes["height"]], "frames": shapes["frames"],
            "seconds_of_video": (shapes["frames"] - 1) / args.fps if args.fps else None, "fps": args.fps,
            "latent": shapes["latent"], "n_visual_tokens": shapes["n_visual_tokens"], "dtype": str(dtype),
            "vae_dtype": str(vae_dtype), "vae_tiling": args.vae_tiling, "attn_backend": args.attn_backend,
            "compile": args.compile, "sp": sp, "components": comps, "warmup": args.warmup, "iters": args.iters,
            "text_encoder_shape": te_shape, "vae_shape": vae_shape or "AutoencoderKLWan() default (Wan2.1)",
            "text_encoder_attn_implementation": args.text_attn,
        },
        "mem_source": mem_source(device),
        "paper_table7_h100": PAPER_TABLE7_H100,
    }
    gen = torch.Generator(device=device).manual_seed(args.seed)
    text_states = None

    # ---- text encoder (rank 0 only: the paper does not parallelise it either) ------------------------
    if "text" in comps:
        if rank0:
            te = build_text_encoder(te_shape, device, dtype, args.seed, args.text_attn)
            ids = torch.randint(0, te_shape["vocab_size"], (B, L), generator=gen, device=device)
            am = torch.ones(B, L, dtype=torch.long, device=device)
            if args.text_valid is not None:
                am[:, args.text_valid:] = 0
            result = {}

            def run_te():
                with torch.inference_mode():
                    result["h"] = te(input_ids=ids, attention_mask=am).last_hidden_state

            mem_reset(device)
            times = time_fn(run_te, args.warmup, args.iters, device)
            fl = mf.t5_encoder_forward_flops(B, L, te_shape["d_model"], te_shape["num_layers"], te_shape["num_heads"],
                                             te_shape["d_kv"], te_shape["d_ff"])
            s = summary(times)
            out["text_encoder"] = {**s, "params": n_params(te), "flops": fl, "tflops_per_s": fl / s["seconds"] / 1e12,
                                   "peak_mem_gib": mem_peak_gib(device)}
            if te_shape["d_model"] == cfg.text_dim:
                text_states = result["h"].to(dtype)
            del te, result
            free(device)
        if group is not None:
            dist.barrier()

    # ---- DiT: the one-step generator ------------------------------------------------------------------
    if "dit" in comps:
        G = OneStepGenerator(build_backbone(args.preset, device, dtype, args.seed)).eval().requires_grad_(False)
        z = torch.randn(B, C, T, H, W, generator=gen, device=device).to(dtype)
        text, mask = random_text(B, L, cfg.text_dim, args.text_valid, device, dtype, gen)
        if text_states is not None and sp == 1:
            text = text_states
        if args.compile:
            parallelize_mmdit(G, ParallelDims(), compile=True)

        def run_dit():
            with torch.inference_mode():
                return G(z, text, mask)

        lc = L + ((-L) % sp)  # sequence parallel pads the text to a multiple of sp
        fl = mf.mmdit_forward_flops(cfg, B, shapes["n_visual_tokens"], lc)
        dit: dict[str, Any] = {"params": n_params(G), "flops": fl,
                               "flops_breakdown": mf.mmdit_forward_flops(cfg, B, shapes["n_visual_tokens"], lc,
                                                                         breakdown=True)}
        sp_info = None
        if sp > 1:
            base_s, source = args.sp_baseline_seconds, "given"
            if base_s is None and not args.no_sp_baseline:
                source = "measured on rank 0 before parallelising"
                if rank0:
                    mem_reset(device)
                    bt = time_fn(run_dit, args.warmup, args.iters, device)
                    base_s = sum(bt) / len(bt)
                    dit["baseline_1gpu"] = {**summary(bt), "peak_mem_gib": mem_peak_gib(device)}
                obj = [base_s]
                dist.broadcast_object_list(obj, src=0)
                base_s = obj[0]
            parallelize_mmdit(G, ParallelDims(sp=sp))
            sp_info = {"size": sp, "baseline_dit_seconds": base_s, "baseline_source": source if base_s else None}
        mem_reset(device)
        times = time_fn(run_dit, args.warmup, args.iters, device, group)
        s = summary(times)
        peak = mem_peak_gib(device)
        dit.update(s)
        dit.update(mf.mfu_report(fl, s["seconds"], device, peak=args.peak_tflops * 1e12 if args.peak_tflops else None,
                                 measured_peak=args.measured_peak_tflops * 1e12, num_gpus=sp))
        dit["peak_mem_gib"] = peak
        if group is not None:
            t = torch.tensor([peak], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            dit["peak_mem_gib_max_rank"] = float(t.item())
        if sp_info is not None:
            if sp_info["baseline_dit_seconds"]:
                b = sp_info["baseline_dit_seconds"]
                sp_info.update(dit_seconds=s["seconds"], speedup=b / s["seconds"],
                               scaling_efficiency=b / (sp * s["seconds"]))
            out["sp"] = sp_info
        out["dit"] = dit
        del G, z, text, mask
        free(device)

    # ---- VAE decode (rank 0 only) ----------------------------------------------------------------------
    if "vae" in comps:
        if rank0:
            vae = build_vae(vae_shape, device, vae_dtype, args.seed)
            latent = torch.randn(B, vae.config.z_dim, T, H, W, generator=gen, device=device).to(vae_dtype)
            modes = {"off": [False], "on": [True], "both": [False, True]}[args.vae_tiling]
            for tiled in modes:
                if tiled:
                    vae.enable_tiling(**(SMOKE_TILING if args.smoke else {}))
                else:
                    vae.disable_tiling()
                res: dict[str, torch.Tensor] = {}

                def run_vae(res=res):
                    with torch.inference_mode():
                        res["video"] = vae.decode(latent, return_dict=False)[0]

                mem_reset(device)
                times = time_fn(run_vae, args.warmup, args.iters, device)
                entry = {**summary(times), "params": n_params(vae), "tiling": tiled,
                         "peak_mem_gib": mem_peak_gib(device), "output_shape": list(res["video"].shape)}
                out["vae_tiled" if tiled and len(modes) > 1 else "vae"] = entry
                del res
            del vae, latent
            free(device)
        if group is not None:
            dist.barrier()

    if rank0:
        parts = {"text": "text_encoder", "dit": "dit", "vae": "vae"}
        out["total_s"] = sum(out[parts[c]]["seconds"] for c in comps)
        out["peak_mem_gib"] = max(out[parts[c]]["peak_mem_gib"] for c in comps)
    return out


def print_inference(res: dict[str, Any]) -> None:
    cfg = res["config"]
    paper = PAPER_TABLE7_H100.get(str(cfg["sp"]), {})
    print(f"\ninference  preset={cfg['preset']}  video {cfg['resolution'][0]}x{cfg['resolution'][1]} x {cfg['frames']} "
          f"frames  latent {'x'.join(map(str, cfg['latent']))}  {cfg['n_visual_tokens']} visual + {cfg['text_len']} "
          f"text tokens  sp={cfg['sp']}  attn={cfg['attn_backend']}  compile={cfg['compile']}")
    print(f"{'component':<16}{'seconds':>10}{'min':>10}{'paper H100':>12}{'TFLOP/s':>10}{'peak GiB':>10}")
    rows = [("text encoder", "text_encoder", "text_encoder"), ("DiT", "dit", "dit"), ("VAE", "vae", "vae"),
            ("VAE (tiled)", "vae_tiled", None)]
    for label, key, pkey in rows:
        if key not in res:
            continue
        e = res[key]
        tf = e.get("tflops_per_s")
        print(f"{label:<16}{e['seconds']:>10.3f}{e['seconds_min']:>10.3f}"
              f"{(paper.get(pkey) if pkey else None) or float('nan'):>12.2f}"
              f"{tf if tf is not None else float('nan'):>10.1f}{e['peak_mem_gib']:>10.2f}")
    print(f"{'total':<16}{res['total_s']:>10.3f}{'':>10}{paper.get('total', float('nan')):>12.2f}")
    if "dit" in res:
        d = res["dit"]
        print(f"DiT: {d['flops'] / 1e12:.1f} TFLOP per forward ({d['flops_breakdown']['attention'] / d['flops']:.0%} "
              f"attention), {d['tflops_per_s_per_gpu']:.1f} TFLOP/s per GPU, MFU {d['mfu_datasheet']:.1%} of "
              f"{d['peak_tflops_datasheet']:.0f} ({d['peak_source']}), {d['mfu_measured']:.1%} of the measured "
              f"{d['peak_tflops_measured']:.0f}")
    if res.get("sp"):
        s = res["sp"]
        if s.get("scaling_efficiency"):
            print(f"sequence parallel {s['size']}: DiT {s['dit_seconds']:.3f} s vs {s['baseline_dit_seconds']:.3f} s on 1 "
                  f"GPU ({s['baseline_source']}): speedup {s['speedup']:.2f}x, scaling efficiency "
                  f"{s['scaling_efficiency']:.1%}")
        else:
            print(f"sequence parallel {s['size']}: no 1-GPU baseline (pass --sp-baseline-seconds)")


# ------------------------------------------------------------------------------------------------------
# training steps
# ------------------------------------------------------------------------------------------------------
def _autocast(device: torch.device, precision: str):
    if precision == "autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _flow_step(model, x0, text, mask, gen, amp):
    B = x0.shape[0]
    t = torch.rand(B, generator=gen, device=x0.device).to(x0.dtype)
    eps = torch.randn(x0.shape, generator=gen, device=x0.device).to(x0.dtype)
    tb = t.view(B, 1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * eps
    with amp():
        v = model(xt, t, text, mask)
    loss = F.mse_loss(v.float(), (eps - x0).float())
    loss.backward()
    return {"loss": loss.detach()}


def _cd_step(student, teacher, ema, x0, text, neg_text, mask, gen, amp, *, guidance=7.5, n_steps=25):
    """Discrete-time consistency distillation (paper §3.1): the teacher takes one Euler step from t_n to
    t_{n-1} under constant CFG, the EMA student predicts x0 from there, the student from t_n (MSE)."""
    B = x0.shape[0]
    n = torch.randint(1, n_steps + 1, (B,), generator=gen, device=x0.device)
    t = (n.float() / n_steps).to(x0.dtype)
    t_prev = ((n - 1).float() / n_steps).to(x0.dtype)
    eps = torch.randn(x0.shape, generator=gen, device=x0.device).to(x0.dtype)
    tb, tpb = t.view(B, 1, 1, 1, 1), t_prev.view(B, 1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * eps
    with torch.no_grad(), amp():
        two = lambda a, b: torch.cat([a, b])  # noqa: E731
        v_c, v_u = teacher(two(xt, xt), two(t, t), two(text, neg_text),
                           None if mask is None else two(mask, mask)).float().chunk(2)
        x_prev = xt + (tpb - tb) * (v_u + guidance * (v_c - v_u))
        target = x_prev - tpb * ema(x_prev.to(x0.dtype), t_prev, text, mask).float()
    with amp():
        pred = xt - tb * student(xt, t, text, mask)
    loss = F.mse_loss(pred.float(), target.float())
    loss.backward()
    return {"loss": loss.detach()}


def run_train_stage(stage: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from megatron_apt.config.model import DiscriminatorConfig, get_model_config
    from megatron_apt.methods.apt import APTConfig, discriminator_loss, generator_loss
    from megatron_apt.models import Discriminator, OneStepGenerator
    from megatron_apt.parallel import ParallelDims, parallelize_mmdit

    cfg = get_model_config(args.preset)
    shapes = resolve_shapes(args, cfg)
    C, T, H, W = shapes["latent"]
    B, L = args.batch, args.text_len
    Lx = shapes["n_visual_tokens"]
    ac = not args.no_activation_checkpointing
    precision = args.precision
    param_dtype = torch.float32 if precision == "autocast" else torch.bfloat16
    precision_desc = {"autocast": "bf16 autocast: fp32 parameters, gradients and optimizer state, bf16 matmuls",
                      "bf16": "bf16 parameters, gradients and optimizer state (no fp32 master copy)"}[precision]
    amp = lambda: _autocast(device, precision)  # noqa: E731
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x0 = torch.randn(B, C, T, H, W, generator=gen, device=device).to(param_dtype)
    text, mask = random_text(B, L, cfg.text_dim, args.text_valid, device, param_dtype, gen)

    def prep(m):
        if ac or args.compile:
            parallelize_mmdit(m, ParallelDims(), activation_checkpointing=ac, compile=args.compile)
        return m

    mem_reset(device)
    params: dict[str, int] = {}
    if stage == "apt":
        G = prep(OneStepGenerator(build_backbone(args.preset, device, param_dtype, args.seed)))
        with torch.device(device):  # the new heads, on the device with the backbone
            D = Discriminator(build_backbone(args.preset, device, param_dtype, args.seed + 1), DiscriminatorConfig())
        D.init_heads(generator=torch.Generator(device=device).manual_seed(args.seed + 2))
        D = prep(D.to(param_dtype))
        opt_g = torch.optim.RMSprop(G.parameters(), lr=args.lr, alpha=0.9)
        opt_d = torch.optim.RMSprop(D.parameters(), lr=args.lr, alpha=0.9)
        apt_cfg = APTConfig(r1_lambda=100.0, r1_sigma=0.1, timestep_shift=12.0)  # the paper's video stage
        params = {"generator": n_params(G), "discriminator": n_params(D)}
        optimizer = "RMSprop(alpha=0.9) for G and D (Adam with beta1=0, beta2=0.9)"

        def step():
            # discriminator update: G under no_grad, D on [real, perturbed real, fake] (Eq. 10)
            with amp():
                d_loss, dm = discriminator_loss(D, G, x0, text, mask, cfg=apt_cfg, generator=gen)
            d_loss.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            # generator update: gradients flow through a frozen D into G (Eq. 2)
            D.requires_grad_(False)
            with amp():
                g_loss, gm, _ = generator_loss(D, G, text, mask, shape=x0.shape, cfg=apt_cfg, generator=gen,
                                               device=device, dtype=param_dtype)
            g_loss.backward()
            D.requires_grad_(True)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            return {"d_loss": dm["d_loss"], "ar1": dm["ar1"], "g_loss": gm["g_loss"]}

        flops = mf.apt_step_flops(cfg, B, Lx, L, DiscriminatorConfig(), activation_checkpointing=ac)
    elif stage == "flow":
        model = prep(build_backbone(args.preset, device, param_dtype, args.seed))
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
        params = {"model": n_params(model)}
        optimizer = "AdamW(betas=(0.9, 0.999), weight_decay=0)"

        def step():
            m = _flow_step(model, x0, text, mask, gen, amp)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return m

        flops = mf.flow_matching_step_flops(cfg, B, Lx, L, activation_checkpointing=ac)
    elif stage == "cd":
        student = prep(build_backbone(args.preset, device, param_dtype, args.seed))
        # the teacher (the diffusion model) and the EMA target are frozen bf16 copies
        teacher = build_backbone(args.preset, device, torch.bfloat16, args.seed + 3).eval().requires_grad_(False)
        ema = copy.deepcopy(student).to(torch.bfloat16).eval().requires_grad_(False)
        if args.compile:
            parallelize_mmdit(teacher, ParallelDims(), compile=True)
        neg_text = torch.zeros_like(text)  # a fixed negative prompt's states stand in here
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
        params = {"student": n_params(student), "teacher": n_params(teacher), "ema": n_params(ema)}
        optimizer = "AdamW(betas=(0.9, 0.999), weight_decay=0); EMA 0.995"
        s_params = list(student.parameters())
        e_params = list(ema.parameters())

        def step():
            m = _cd_step(student, teacher, ema, x0, text, neg_text, mask, gen, amp)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(e_params, [p.detach().to(torch.bfloat16) for p in s_params], 1 - 0.995)
            return m

        flops = mf.consistency_step_flops(cfg, B, Lx, L, activation_checkpointing=ac)
    else:
        raise ValueError(f"unknown stage {stage!r}")

    resident_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    last: dict[str, torch.Tensor] = {}

    def timed_step():
        last.update(step())

    mem_reset(device)
    times = time_fn(timed_step, args.warmup, args.iters, device)
    s = summary(times)
    peak = mem_peak_gib(device)
    losses = {k: float(v.float().item()) for k, v in last.items()}
    rep = mf.mfu_report(flops.model, s["seconds"], device, peak=args.peak_tflops * 1e12 if args.peak_tflops else None,
                        measured_peak=args.measured_peak_tflops * 1e12)
    res = {
        "stage": stage,
        "step_time_s": s["seconds"], "step_time_min_s": s["seconds_min"], "step_times_s": s["seconds_all"],
        "samples_per_s": B / s["seconds"],
        "flops_per_step": flops.model, "hardware_flops_per_step": flops.hardware, "flops": flops.to_dict(),
        "model_tflops_per_s": rep["tflops_per_s"], "hardware_tflops_per_s": flops.hardware / s["seconds"] / 1e12,
        "mfu_datasheet": rep["mfu_datasheet"], "mfu_measured": rep["mfu_measured"],
        "peak_tflops_datasheet": rep["peak_tflops_datasheet"], "peak_source": rep["peak_source"],
        "peak_tflops_measured": rep["peak_tflops_measured"],
        "peak_mem_gib": peak, "resident_after_build_gib": resident_gib,
        "params": params, "losses": losses, "losses_finite": all(math.isfinite(v) for v in losses.values()),
        "optimizer": optimizer, "precision": precision_desc,
        "config": {"preset": args.preset, "latent": shapes["latent"], "n_visual_tokens": Lx, "text_len": L,
                   "text_valid": args.text_valid, "micro_batch": B, "activation_checkpointing": ac,
                   "compile": args.compile, "attn_backend": args.attn_backend, "lr": args.lr,
                   "warmup": args.warmup, "iters": args.iters, "resolution": [shapes["width"], shapes["height"]],
                   "frames": shapes["frames"]},
    }
    return res


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
              f"activation checkpointing={c['activation_checkpointing']}  compile={c['compile']}")
        print(f"  precision: {r['precision']};  optimizer: {r['optimizer']}")
        print(f"  step {r['step_time_s']:.3f} s (min {r['step_time_min_s']:.3f})  {r['samples_per_s']:.3f} samples/s  "
              f"{r['flops_per_step'] / 1e12:.1f} model TFLOP/step ({r['flops']['forward_equivalents']:.2f} forwards)")
        print(f"  model {r['model_tflops_per_s']:.1f} TFLOP/s (hardware, with recompute, "
              f"{r['hardware_tflops_per_s']:.1f})  MFU {r['mfu_datasheet']:.1%} of {r['peak_tflops_datasheet']:.0f} "
              f"({r['peak_source']}), {r['mfu_measured']:.1%} of measured {r['peak_tflops_measured']:.0f}")
        print(f"  peak memory {r['peak_mem_gib']:.2f} GiB  losses {r['losses']}"
              + ("" if r["losses_finite"] else "  (non-finite: random weights in bf16; timing is unaffected)"))


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["inference", "train"], required=True)
    p.add_argument("--stage", default="apt", help="training stage(s) for --mode train: apt, flow, cd, a comma list, or all")
    p.add_argument("--preset", default=None, help="model size (default: 8b for inference, 2b for train, debug with --smoke)")
    g = p.add_argument_group("shape")
    g.add_argument("--resolution", default=None, help="WIDTHxHEIGHT of the video (default 1280x720)")
    g.add_argument("--seconds", type=float, default=2.0, help="video length (frames = seconds x fps + 1)")
    g.add_argument("--fps", type=float, default=24.0)
    g.add_argument("--frames", type=int, default=None, help="frame count (1 + 4k), instead of --seconds x --fps")
    g.add_argument("--latent", default=None, help="CxTxHxW latent, instead of the resolution (e.g. 16x13x90x160)")
    g.add_argument("--text-len", type=int, default=None, help="text tokens (default 512)")
    g.add_argument("--text-valid", type=int, default=None,
                   help="valid text tokens per sample; fewer than --text-len adds a padding mask (default: all valid)")
    g.add_argument("--batch", "--micro-batch", dest="batch", type=int, default=1, help="samples per call / micro-batch")
    r = p.add_argument_group("run")
    r.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    r.add_argument("--dtype", choices=list(DTYPES), default=None, help="inference dtype (default bf16; fp32 on cpu)")
    r.add_argument("--vae-dtype", choices=list(DTYPES), default=None, help="VAE dtype (default: --dtype)")
    r.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 2 inference, 1 train)")
    r.add_argument("--iters", type=int, default=None, help="timed iterations (default 5 inference, 3 train)")
    r.add_argument("--attention-backend", "--attn-backend", dest="attn_backend",
                   default=os.environ.get("MEGATRON_APT_ATTN", "auto"), choices=list(ATTENTION_BACKENDS),
                   help="attention kernel (model.attention_backend; default $MEGATRON_APT_ATTN, else auto)")
    r.add_argument("--compile", action="store_true", help="torch.compile every block (parallelize_mmdit(compile=True))")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", default=None, help="write every result field to this JSON file")
    r.add_argument("--smoke", action="store_true",
                   help="tiny sizes (debug preset, tiny latent, tiny UMT5 and Wan VAE) that run on a CPU in seconds")
    i = p.add_argument_group("inference")
    i.add_argument("--components", default="text,dit,vae", help="comma list of text, dit, vae")
    i.add_argument("--vae-tiling", nargs="?", const="on", default=None, choices=["off", "on", "both"],
                   help="decode tiled (on), untiled (off, default) or both (default with --smoke)")
    i.add_argument("--text-attn", default="sdpa", choices=["sdpa", "eager"], help="UMT5 attention implementation")
    i.add_argument("--sp", type=int, default=1, help="sequence-parallel DiT over N GPUs (run under torchrun)")
    i.add_argument("--sp-baseline-seconds", type=float, default=None,
                   help="1-GPU DiT seconds for the scaling efficiency (default: measured on rank 0 first)")
    i.add_argument("--no-sp-baseline", action="store_true", help="skip the 1-GPU measurement")
    t = p.add_argument_group("train")
    t.add_argument("--no-activation-checkpointing", action="store_true")
    t.add_argument("--precision", choices=["autocast", "bf16"], default="autocast",
                   help="autocast: fp32 params + bf16 autocast (mixed precision); bf16: bf16 params and state")
    t.add_argument("--lr", type=float, default=3e-6)
    m = p.add_argument_group("MFU")
    m.add_argument("--peak-tflops", type=float, default=None,
                   help="datasheet peak to report MFU against (default: from the device name; 989 for H100/H200 SXM)")
    m.add_argument("--measured-peak-tflops", type=float, default=mf.MEASURED_H200_BF16 / 1e12,
                   help="measured dense-matmul ceiling for the second MFU figure (default 800, one H200)")
    return p


def apply_defaults(args: argparse.Namespace) -> None:
    if args.smoke:
        args.preset = args.preset or "debug"
        args.resolution = args.resolution or "32x32"
        if args.latent is None and args.frames is None:
            args.frames = 5
        args.text_len = args.text_len or 8
        args.warmup = 1 if args.warmup is None else args.warmup
        args.iters = 1 if args.iters is None else args.iters
        args.device = args.device or "cpu"
        args.vae_tiling = args.vae_tiling or "both"
    args.preset = args.preset or ("8b" if args.mode == "inference" else "2b")
    args.resolution = args.resolution or "1280x720"
    args.text_len = args.text_len or 512
    args.vae_tiling = args.vae_tiling or "off"
    args.warmup = args.warmup if args.warmup is not None else (2 if args.mode == "inference" else 1)
    args.iters = args.iters if args.iters is not None else (5 if args.mode == "inference" else 3)
    if args.iters < 1 or args.warmup < 0:
        raise ValueError("--iters must be >= 1 and --warmup >= 0")
    if args.batch < 1 or args.text_len < 1:
        raise ValueError("--batch and --text-len must be >= 1")
    if args.text_valid is not None and not 1 <= args.text_valid <= args.text_len:
        raise ValueError(f"--text-valid must be in 1..{args.text_len}")
    stages = ["apt", "flow", "cd"] if args.stage == "all" else [x.strip() for x in args.stage.split(",") if x.strip()]
    if not stages or set(stages) - {"apt", "flow", "cd"} or len(set(stages)) != len(stages):
        raise ValueError(f"--stage takes apt, flow, cd, a comma list of them, or all; got {args.stage!r}")
    args.stages = stages
    if args.sp < 1:
        raise ValueError("--sp must be >= 1")
    if args.sp > 1 and args.mode != "inference":
        raise ValueError("--sp applies to --mode inference (the training step here runs on one device)")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


@cli_main  # an OSError (permission, a missing folder, a full disk): one line naming the path, status 2
def main(argv: list[str] | None = None) -> int:
    global _RANK
    args = build_parser().parse_args(argv)
    try:
        apply_defaults(args)
        from megatron_apt.config.model import get_model_config

        resolve_shapes(args, get_model_config(args.preset))  # fail on a bad shape before building anything
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.smoke and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny ops: threads only add synchronisation (10x slower on a busy machine)
    if args.sp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from megatron_apt.parallel import ParallelDims, init_distributed, initialize_model_parallel

        rank, world = init_distributed()
        _RANK = rank
        if world != args.sp:
            print(f"error: --sp {args.sp} needs exactly {args.sp} processes (torchrun --nproc_per_node {args.sp}), "
                  f"got a world of {world}", file=sys.stderr)
            return 2
        initialize_model_parallel(ParallelDims(sp=args.sp))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from megatron_apt.models.attention import set_attention_backend

    try:
        chosen = set_attention_backend(args.attn_backend, device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"attention backend: {args.attn_backend}" + (f" -> {chosen}" if args.attn_backend == "auto" else ""))

    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "num_devices": args.sp,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "smoke": args.smoke,
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    t0 = time.perf_counter()
    if args.mode == "inference":
        res = run_inference(args, device, dtype)
    else:
        res = run_train(args, device)
    res = {**res, "env": env, "wall_s": time.perf_counter() - t0}
    if _RANK == 0:
        (print_inference if args.mode == "inference" else print_train)(res)
        if args.json:
            from megatron_apt.utils import atomic_write

            with atomic_write(args.json, "w") as f:
                json.dump(_clean(res), f, indent=2, allow_nan=False)
                f.write("\n")
            print(f"wrote {args.json}")
    if args.sp > 1:
        import torch.distributed as dist

        from megatron_apt.parallel import destroy_model_parallel

        dist.barrier()
        destroy_model_parallel()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
