"""Generate videos (or images) from prompts with a one-step APT generator, or a diffusion baseline.

    python tools/generate.py --model RUN/export/generator_ema --prompt "the digit 3 moving left" \
        --resolution 24x24 --frames 8 --fps 4 --out samples/            # one step (the APT generator)
    python tools/generate.py --model ... --steps 2                       # zero-shot two steps
    python tools/generate.py --model DIFFUSION_DIR --steps 25 --cfg 7.5  # the diffusion baseline
    torchrun --nproc_per_node 8 tools/generate.py --sp 8 ...             # one long video over 8 GPUs

Writes one mp4 per prompt and seed (frames > 1), PNGs for images, and a PNG grid of everything, plus
timings.json (text encoder, DiT, VAE seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from megatron_apt.config.train import ATTENTION_BACKENDS
from megatron_apt.utils import get_logger, progress

log = get_logger("megatron_apt.generate")

from megatron_apt.utils import cli_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (generator, consistency or diffusion kind)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--text-encoder", default="bytes", help="text encoder or tokenizer directory, or 'bytes'")
    p.add_argument("--vae", default="none", help="diffusers VAE directory, or 'none' for a pixel-space model")
    p.add_argument("--resolution", default="1280x720", help="WIDTHxHEIGHT in pixels")
    p.add_argument("--frames", type=int, default=None, help="frames (default: seconds x fps, +1 for a VAE)")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--steps", type=int, default=1, help="sampling steps (1 = one-step generation)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (diffusion baseline)")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of classifier-free guidance "
                   "(the fixed negative prompt the model was distilled with); empty = the null text")
    p.add_argument("--guidance-interval", default=None, metavar="LO-HI",
                   help="apply --cfg only at the steps whose t is in (LO, HI], e.g. 0-0.5 (default: every step)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift of multi-step diffusion sampling "
                   "(default: the one the model was trained with, recorded in its directory)")
    p.add_argument("--timesteps", default=None, help="comma-separated timesteps from 1 to 0 (overrides --steps), "
                   "e.g. 1,0.5,0: a generator's two-step inference re-noising its first prediction to t = 0.5")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one sample per prompt per seed")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--vae-tiling", choices=["auto", "on", "off"], default="auto",
                   help="tiled VAE decode (auto: when free GPU memory looks short)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the blocks (auto: on GPU; ~11%% faster DiT at 8b 720p)")
    p.add_argument("--vae-compile", action="store_true",
                   help="torch.compile the VAE decoder too: the Wan2.1-shape 2 s 720p decode 1.32 s instead of 2.11 "
                        "on one H200, after a first decode that compiles for about 2 minutes; worth it for many videos")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel size (run under torchrun)")
    p.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS),
                   default=os.environ.get("MEGATRON_APT_ATTN", "auto"),
                   help="attention kernel (as model.attention_backend in training; default $MEGATRON_APT_ATTN, else "
                        "auto: the fastest available)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--grid-scale", type=int, default=1)
    return p.parse_args(argv)


@cli_main  # an OSError (an unwritable --out, a full disk): one line naming the path, status 2
def main(argv=None) -> int:
    a = parse_args(argv)
    from megatron_apt.inference.grid import save_grid
    from megatron_apt.inference.pipeline import Generator, Timings
    from megatron_apt.inference.video import write_mp4
    from megatron_apt.models.conditioning import parse_guidance_interval

    try:
        if a.prompts_file:
            pf = Path(a.prompts_file)
            if not pf.is_file():
                raise FileNotFoundError(f"prompt file {pf} does not exist")
            prompts = [line.strip() for line in pf.read_text().splitlines() if line.strip()]
            if not prompts:
                raise ValueError(f"prompt file {pf} holds no prompt")
        else:
            prompts = a.prompt
        try:
            w, h = (int(v) for v in a.resolution.lower().split("x"))
        except ValueError:
            raise ValueError(f"--resolution must look like 1280x720, got {a.resolution!r}") from None
        for name, value, ok in [("--resolution", a.resolution, w >= 1 and h >= 1),
                                ("--frames", a.frames, a.frames is None or a.frames >= 1),
                                ("--fps", a.fps, a.fps > 0), ("--seconds", a.seconds, a.seconds > 0),
                                ("--steps", a.steps, a.steps >= 1), ("--batch-size", a.batch_size, a.batch_size >= 1),
                                ("--grid-scale", a.grid_scale, a.grid_scale >= 1), ("--sp", a.sp, a.sp >= 1)]:
            if not ok:
                raise ValueError(f"{name} must be positive, got {value}")
        timesteps = None
        if a.timesteps:
            from megatron_apt.inference.sampling import check_timesteps

            try:
                timesteps = check_timesteps(float(t) for t in a.timesteps.split(","))
            except ValueError:
                raise ValueError(f"--timesteps must decrease from 1 to 0, e.g. 1,0.5,0; got {a.timesteps!r}") from None
            a.steps = len(timesteps) - 1
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        dims = None
        if a.sp > 1:
            from megatron_apt.parallel import ParallelDims, init_distributed, initialize_model_parallel

            _, world = init_distributed()
            dims = ParallelDims.from_world(world, sp=a.sp)
            if dims.dp != 1:
                raise ValueError(f"--sp {a.sp} must equal the number of processes ({world})")
            initialize_model_parallel(dims)
            if device.type == "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
        from megatron_apt.models.attention import set_attention_backend

        chosen = set_attention_backend(a.attention_backend, device)
        log.info("attention backend %s%s", a.attention_backend,
                 f" -> {chosen}" if a.attention_backend == "auto" else "")
        compile_ = a.compile == "on" or (a.compile == "auto" and device.type == "cuda")
        cuda = device.type == "cuda"
        if cuda and a.vae != "none":
            # The VAE decode on a GPU: cuDNN's per-shape algorithm search and channels-last convolutions (the
            # Wan2.1-shape 2 s 720p decode on one H200, bf16: 2.53 s plain, 2.35 s searched, 2.11 s both). This
            # process only generates; evaluation keeps cuDNN's default choice.
            torch.backends.cudnn.benchmark = True
        gen = Generator(a.model, text=a.text_encoder, vae=a.vae, device=device, dtype=dtype, parallel_dims=dims,
                        compile=compile_, shift=a.shift, vae_channels_last=cuda, vae_compile=a.vae_compile)
        if a.cfg != 1.0 and gen.kind != "diffusion":
            raise ValueError(f"--cfg {a.cfg:g}: a {gen.kind} model samples without classifier-free guidance")
        interval = None
        if a.guidance_interval is not None:
            if a.cfg == 1.0:
                raise ValueError("--guidance-interval needs --cfg other than 1 (there is no guidance to limit)")
            interval = parse_guidance_interval(a.guidance_interval)
        frames = a.frames
        if frames is None:
            frames = max(1, round(a.seconds * a.fps))
            if gen.vae is not None and gen.vae.temporal_compression > 1:
                frames = (frames // gen.vae.temporal_compression) * gen.vae.temporal_compression + 1
        gen.latent_shape(frames, h, w)  # validates the size against the VAE and patch factors up front
        try:
            seeds = [int(s) for s in a.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds takes comma-separated integers, got {a.seeds!r}") from None
        gen.check_memory(frames, h, w, min(a.batch_size, len(prompts) * len(seeds)), len(prompts) * len(seeds))
        tile = a.vae_tiling == "on"
        if a.vae_tiling == "auto" and gen.vae is not None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            # an untiled 720p 2 s decode peaks near 10 GiB (compiled: near 15, with the compile's own allocations)
            tile = free < (16 + 6 * a.vae_compile) * 2**30 * max(1, a.batch_size)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
    out = Path(a.out)
    timings = Timings()
    videos, names = [], []
    jobs = [(p, s) for s in seeds for p in prompts]
    for i in progress(range(0, len(jobs), a.batch_size), desc="generate", unit="batch"):
        chunk = jobs[i:i + a.batch_size]
        for seed in sorted({s for _, s in chunk}):
            ps = [p for p, s in chunk if s == seed]
            v = gen.generate(ps, frames=frames, height=h, width=w, seed=seed + i, steps=a.steps, cfg_scale=a.cfg,
                             tile_vae=tile, timings=timings, negative_prompt=a.negative_prompt, timesteps=timesteps,
                             guidance_interval=interval)
            for p, vid in zip(ps, v):
                videos.append(vid.cpu())
                names.append((p, seed))
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        for k, ((p, seed), vid) in enumerate(zip(names, videos)):
            stem = f"{k:03d}_seed{seed}_" + "".join(c if c.isalnum() else "_" for c in p)[:40]
            if vid.shape[1] > 1:
                write_mp4(vid, out / f"{stem}.mp4", fps=a.fps)
            else:
                save_grid(vid[None], out / f"{stem}.png", scale=a.grid_scale)
        save_grid(torch.stack(videos), out / "grid.png", scale=a.grid_scale)
        rec = {"model": a.model, "steps": a.steps, "cfg": a.cfg, "negative_prompt": a.negative_prompt,
               "guidance_interval": interval, "timesteps": timesteps, "shift": gen.shift, "samples": len(videos),
               "frames": frames,
               "resolution": [w, h], "text_s": timings.text, "dit_s": timings.dit, "vae_s": timings.vae,
               "total_s": timings.total, "device": str(device), "dtype": str(dtype)}
        (out / "timings.json").write_text(json.dumps(rec, indent=2) + "\n")
        print(f"wrote {len(videos)} samples to {out} (text {timings.text:.3f} s, DiT {timings.dit:.3f} s, "
              f"VAE {timings.vae:.3f} s, total {timings.total:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
