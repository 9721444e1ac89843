"""The shapes a profile runs at: the text encoder's and VAE's fixed configurations (Wan2.1 / UMT5-XXL,
and tiny ones for --smoke), and a video's latent from its resolution, length and frame rate."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from megatron_apt.models import flops as mf

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
