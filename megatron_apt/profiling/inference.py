"""One-step generation, component by component (the paper's Table 7): the text encoder, the DiT (one step,
optionally Ulysses sequence parallel with its scaling efficiency) and the VAE decode."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from megatron_apt.models import flops as mf
from megatron_apt.profiling.builders import build_backbone, build_text_encoder, build_vae, random_text
from megatron_apt.profiling.shapes import (
    DTYPES,
    PAPER_TABLE7_H100,
    SMOKE_TILING,
    SMOKE_UMT5,
    SMOKE_VAE,
    UMT5_XXL,
    WAN21_VAE,
    resolve_shapes,
)
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


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def log(*a: Any) -> None:
    if is_rank0():
        print(*a, flush=True)


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
    rank0 = is_rank0()
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
            "text_encoder_attn_implementation": args.text_attn, "vae_channels_last": args.vae_channels_last,
            "vae_compile": args.vae_compile, "cudnn_benchmark": args.cudnn_benchmark, "kernels": args.kernels,
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
        if args.kernels:
            dit["kernels"] = kernel_breakdown(run_dit, device, args.kernels)  # every rank: SP's collectives
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
            from torch._dynamo.utils import counters
            from torch.utils.flop_counter import FlopCounterMode

            from megatron_apt.models.vae import speed_up_decoder

            vae = build_vae(vae_shape, device, vae_dtype, args.seed)
            latent = torch.randn(B, vae.config.z_dim, T, H, W, generator=gen, device=device).to(vae_dtype)
            modes = {"off": [False], "on": [True], "both": [False, True]}[args.vae_tiling]

            def set_tiling(model, tiled: bool) -> None:
                if tiled:
                    model.enable_tiling(**(SMOKE_TILING if args.smoke else {}))
                else:
                    model.disable_tiling()

            # one plain call per mode (eager, default layout): the decode's FLOPs (torch's counter: convolutions
            # and matmuls) and the reference output the sped-up decoder is compared with (kept on the host, out
            # of the device's peak memory)
            vae_flops, plain = {}, {}
            for tiled in modes:
                set_tiling(vae, tiled)
                with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                    plain[tiled] = vae.decode(latent, return_dict=False)[0].float().cpu()
                vae_flops[tiled] = counter.get_total_flops()
            sped_up = args.vae_channels_last or args.vae_compile
            fp32_ref = sped_up and vae_dtype != torch.float32
            if fp32_ref:  # the scale of rounding: the plain decoder in fp32 (no TF32), on the same latent
                ref, fp32 = {}, build_vae(vae_shape, device, torch.float32, args.seed)
                tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
                try:
                    for tiled in modes:
                        set_tiling(fp32, tiled)
                        with torch.inference_mode():
                            ref[tiled] = fp32.decode(latent.float(), return_dict=False)[0].cpu()
                finally:
                    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
                del fp32
                free(device)
            speed_up_decoder(vae, channels_last=args.vae_channels_last, compile=args.vae_compile)
            for tiled in modes:
                set_tiling(vae, tiled)
                res: dict[str, torch.Tensor] = {}

                def run_vae(res=res):
                    with torch.inference_mode():
                        res["video"] = vae.decode(latent, return_dict=False)[0]

                # the warm-up calls compile (with --vae-compile) and search cuDNN's algorithms (--cudnn-benchmark):
                # their peak memory is reported apart from the timed calls'
                mem_reset(device)
                graphs, limit_hits = counters["stats"]["unique_graphs"], recompile_limit_hits()
                for _ in range(args.warmup):
                    run_vae()
                graphs_warm, warm_peak = counters["stats"]["unique_graphs"], mem_peak_gib(device)
                mem_reset(device)
                times = time_fn(run_vae, 0, args.iters, device)
                vs = summary(times)
                entry = {**vs, "params": n_params(vae), "tiling": tiled, "flops": vae_flops[tiled],
                         "tflops_per_s": vae_flops[tiled] / vs["seconds"] / 1e12,
                         "peak_mem_gib": mem_peak_gib(device), "peak_mem_warmup_gib": warm_peak,
                         "output_shape": list(res["video"].shape)}
                if args.vae_compile:
                    entry["graphs_compiled"] = graphs_warm - graphs
                    entry["graphs_compiled_while_timed"] = counters["stats"]["unique_graphs"] - graphs_warm
                    entry["recompile_limit_hit"] = recompile_limit_hits() > limit_hits  # then parts ran eagerly
                if sped_up:
                    video = res["video"].float().cpu()
                    entry["max_abs_diff_vs_plain"] = (video - plain[tiled]).abs().max().item()
                    if fp32_ref:
                        entry["max_abs_diff_vs_fp32"] = (video - ref[tiled]).abs().max().item()
                        entry["plain_max_abs_diff_vs_fp32"] = (plain[tiled] - ref[tiled]).abs().max().item()
                    del video
                if args.kernels:
                    entry["kernels"] = kernel_breakdown(run_vae, device, args.kernels)
                out["vae_tiled" if tiled and len(modes) > 1 else "vae"] = entry
                del res
            del vae, latent, plain
            if fp32_ref:
                del ref
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
    for key, what in (("dit", "one more DiT forward"), ("vae", "one more VAE decode"),
                      ("vae_tiled", "one more tiled VAE decode")):
        e = res.get(key) or {}
        if e.get("max_abs_diff_vs_plain") is not None:
            print(f"{key}: largest difference from the plain decoder (eager, default layout): "
                  f"{e['max_abs_diff_vs_plain']:.3g} (output in [-1, 1])"
                  + (f"; from the plain decoder in fp32: {e['max_abs_diff_vs_fp32']:.3g}, the plain decoder's own "
                     f"{e['plain_max_abs_diff_vs_fp32']:.3g}" if "max_abs_diff_vs_fp32" in e else ""))
        if "graphs_compiled" in e:
            print(f"{key}: graphs compiled in the warm-up calls {e['graphs_compiled']}, in the timed calls "
                  f"{e['graphs_compiled_while_timed']}"
                  + ("; dynamo hit its recompile limit: parts of the decoder ran eagerly" if e["recompile_limit_hit"]
                     else ""))
        if e.get("kernels"):
            print_kernels(e["kernels"], what, indent="")
    if res.get("sp"):
        s = res["sp"]
        if s.get("scaling_efficiency"):
            print(f"sequence parallel {s['size']}: DiT {s['dit_seconds']:.3f} s vs {s['baseline_dit_seconds']:.3f} s on 1 "
                  f"GPU ({s['baseline_source']}): speedup {s['speedup']:.2f}x, scaling efficiency "
                  f"{s['scaling_efficiency']:.1%}")
        else:
            print(f"sequence parallel {s['size']}: no 1-GPU baseline (pass --sp-baseline-seconds)")
