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
import math
import os
import time
from typing import Any

import torch

from megatron_apt.models import flops as mf
import json
import platform
import sys

from megatron_apt.config.train import ATTENTION_BACKENDS, CHECKPOINT_SCOPES
from megatron_apt.utils import cli_main
from megatron_apt.profiling.inference import is_rank0, log, print_inference, run_inference
from megatron_apt.profiling.shapes import DTYPES, resolve_shapes
from megatron_apt.profiling.train import print_train, run_train

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
    i.add_argument("--vae-channels-last", action="store_true",
                   help="the VAE's convolutions in the channels-last layout (cuDNN's NDHWC kernels)")
    i.add_argument("--vae-compile", action="store_true", help="torch.compile the VAE's decoder")
    i.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark: cuDNN times its convolution algorithms per shape and keeps the fastest")
    i.add_argument("--text-attn", default="sdpa", choices=["sdpa", "eager"], help="UMT5 attention implementation")
    i.add_argument("--sp", type=int, default=1, help="sequence-parallel DiT over N GPUs (run under torchrun)")
    i.add_argument("--sp-baseline-seconds", type=float, default=None,
                   help="1-GPU DiT seconds for the scaling efficiency (default: measured on rank 0 first)")
    i.add_argument("--no-sp-baseline", action="store_true", help="skip the 1-GPU measurement")
    t = p.add_argument_group("train")
    t.add_argument("--no-activation-checkpointing", action="store_true")
    t.add_argument("--checkpoint-scope", choices=list(CHECKPOINT_SCOPES), default="block",
                   help="what activation checkpointing recomputes: whole blocks, only their MLPs, or all but the attention kernel")
    t.add_argument("--precision", choices=["autocast", "bf16"], default="autocast",
                   help="autocast: fp32 params + bf16 autocast (mixed precision); bf16: bf16 params and state")
    t.add_argument("--lr", type=float, default=3e-6)
    r.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="after the timed steps (train) or calls (inference: the DiT and the VAE decode), profile one "
                        "more (torch.profiler): device busy time against wall, time by kernel family and the N "
                        "longest kernels")
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
    if args.kernels < 0:
        raise ValueError("--kernels must be >= 0")
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
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
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
    if is_rank0():
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
