#!/usr/bin/env python
"""Throughput of tools/preprocess_video.py: clips/s and MB/s (input bytes read, output bytes written).

Everything is synthesized on the spot; nothing is downloaded.

    # CPU, toy data (512 moving-digit videos, 32x32, 16 frames): pixels + byte ids, and tiny VAE + tiny UMT5
    python -m benchmarks.bench_preprocess      # from the repository root (it borrows the tests' tiny models)

    # GPU: 720p 2 s clips (49 frames at 24 fps) through a Wan2.1-shaped AutoencoderKLWan (default config,
    # random weights, bf16), from synthetic 720p h264 videos
    python -m benchmarks.bench_preprocess --case wan720p --device cuda --videos 16

Each case runs the real job (listing, decode workers, encoding, part files, shard merge) through
``megatron_apt.data.preprocess.process`` and reports wall-clock rates, which include model loading
(printed separately) but not the import of the libraries.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402


def _run(argv: list[str]):
    from megatron_apt.data.preprocess import build_parser, process

    t0 = time.perf_counter()
    stats = process(build_parser().parse_args(argv))
    return stats, time.perf_counter() - t0


def _report(name: str, stats, wall: float, note: str = "") -> dict:
    row = {
        "case": name,
        "clips": stats.clips,
        "wall_s": round(wall, 2),
        "clips_per_s": round(stats.clips / wall, 2),
        "MB_in_per_s": round(stats.bytes_in / 1e6 / wall, 2),
        "MB_out_per_s": round(stats.bytes_out / 1e6 / wall, 2),
        "decode_s_summed": round(stats.decode_seconds, 2),
        "encode_s": round(stats.encode_seconds, 2),
        "MB_in": round(stats.bytes_in / 1e6, 2),
        "MB_out": round(stats.bytes_out / 1e6, 2),
    }
    print(f"{name:<28} {row['clips']:>5} clips  {row['wall_s']:>7.2f} s  {row['clips_per_s']:>8.1f} clips/s  "
          f"{row['MB_in_per_s']:>7.2f} MB/s in  {row['MB_out_per_s']:>8.2f} MB/s out  "
          f"(decode {row['decode_s_summed']} s summed over workers, encode {row['encode_s']} s){note}", flush=True)
    return row


def bench_toy(args, work: Path) -> list[dict]:
    from tests.helpers.fixtures import make_tiny_text_encoder, make_tiny_wan_vae
    from megatron_apt.data.toy import make_toy_dataset

    t0 = time.perf_counter()
    make_toy_dataset(work / "toy", num=args.num, seed=0)
    print(f"toy data: {args.num} videos written in {time.perf_counter() - t0:.1f} s", flush=True)
    common = ["--input", str(work / "toy"), "--resolution", "32x32", "--fps", "8", "--no-progress",
              "--workers", str(args.workers), "--device", args.device, "--torch-threads", str(args.torch_threads)]
    rows = []
    # Warm-up on a few inputs so that one-time costs (imports, codec initialisation) are not timed.
    lines = (work / "toy" / "metadata.jsonl").read_text().splitlines()[:16]
    (work / "toy" / "warm.jsonl").write_text("\n".join(lines) + "\n")
    _run(["--input", str(work / "toy" / "warm.jsonl"), *common[2:], "--frames", "16", "--output", str(work / "warm")])
    stats, wall = _run(common + ["--frames", "16", "--output", str(work / "pixels")])
    rows.append(_report("toy pixels + byte ids", stats, wall))
    if not args.skip_models:
        wan = make_tiny_wan_vae(work / "wan")
        umt5 = make_tiny_text_encoder(work / "umt5")
        stats, wall = _run(common + ["--frames", "13", "--vae", wan, "--text-encoder", umt5, "--batch-size", "16",
                                     "--output", str(work / "latents")])
        rows.append(_report("toy tiny Wan VAE + UMT5", stats, wall, " [includes model loading]"))
    return rows


def _synth_720p(path: Path, seconds: float, fps: int, seed: int) -> None:
    """A 1280x720 h264 video with moving colour gradients and noise (so it does not compress to nothing)."""
    from tests.helpers.fixtures import write_video

    n = int(round(seconds * fps))
    rng = np.random.default_rng(seed)
    h, w = 720, 1280
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        phase = i / fps
        r = 127 + 100 * np.sin(xx / 97.0 + phase * 2.0)
        g = 127 + 100 * np.sin(yy / 53.0 - phase * 1.3)
        b = 127 + 100 * np.sin((xx + yy) / 151.0 + phase)
        img = np.stack([r, g, b], -1) + rng.normal(0, 6, (h, w, 3))
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    write_video(path, frames, fps, crf=18)


def bench_wan720p(args, work: Path) -> list[dict]:
    import torch
    from diffusers import AutoencoderKLWan

    src = work / "videos"
    src.mkdir()
    t0 = time.perf_counter()
    _synth_720p(src / "clip_000.mp4", seconds=args.source_seconds, fps=24, seed=0)
    for i in range(args.videos):
        if i:
            shutil.copyfile(src / "clip_000.mp4", src / f"clip_{i:03d}.mp4")
        (src / f"clip_{i:03d}.txt").write_text("colourful waves drifting across the screen\n")
    size = (src / "clip_000.mp4").stat().st_size
    print(f"synthetic input: {args.videos} x 1280x720 {args.source_seconds} s h264 videos of {size / 1e6:.1f} MB "
          f"({time.perf_counter() - t0:.1f} s to make)", flush=True)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoencoderKLWan()  # the Wan2.1 VAE architecture (diffusers' default config), random weights
    model.save_pretrained(work / "wan21_vae")
    print(f"Wan2.1-shaped VAE: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
          f"({time.perf_counter() - t0:.1f} s to build and save)", flush=True)
    del model

    width, height = (int(v) for v in args.resolution.split("x"))
    common = ["--input", str(src), "--resolution", args.resolution, "--fps", "24", "--frames", str(args.frames),
              "--no-progress",
              "--device", args.device, "--workers", str(args.workers), "--vae", str(work / "wan21_vae"),
              "--vae-dtype", args.vae_dtype, "--batch-size", str(args.batch_size)]
    rows = []
    stats, wall = _run(common + ["--output", str(work / "warm"), "--part-size", "1000"])  # warm-up + model load
    _report("wan720p (first run, cold)", stats, wall, " [includes model loading and kernel warm-up]")
    stats, wall = _run(common + ["--output", str(work / "latents"), "--part-size", "1000"])
    rows.append(_report(f"wan {args.resolution} {args.frames}f", stats, wall, " [includes model loading]"))

    # The VAE alone, warm: what the GPU can take if decoding keeps up.
    from megatron_apt.models.vae import load_vae

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.bfloat16 if device.type == "cuda"
             else torch.float32}[args.vae_dtype]
    vae = load_vae(work / "wan21_vae", device=device, dtype=dtype)
    x = torch.rand(args.batch_size, 3, args.frames, height, width, device=device) * 2 - 1
    vae.encode(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        vae.encode(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_clip = (time.perf_counter() - t0) / (reps * args.batch_size)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"VAE encode alone (warm): {per_clip:.3f} s per {args.frames}x{height}x{width} clip = "
          f"{1 / per_clip:.2f} clips/s, "
          f"peak GPU memory {peak:.1f} GiB", flush=True)
    rows.append({"case": "wan VAE encode only", "clips_per_s": round(1 / per_clip, 3), "peak_gib": round(peak, 2)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["toy", "wan720p"], default="toy")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=max(0, min(8, (os.cpu_count() or 1) - 1)), help="decode processes")
    p.add_argument("--num", type=int, default=512, help="toy: number of videos")
    p.add_argument("--skip-models", action="store_true", help="toy: only the pixels case")
    p.add_argument("--videos", type=int, default=16, help="wan720p: number of source videos")
    p.add_argument("--source-seconds", type=float, default=2.5, help="wan720p: length of each source video")
    p.add_argument("--batch-size", type=int, default=1, help="wan720p: clips per VAE forward")
    p.add_argument("--vae-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--resolution", default="1280x720", help="wan720p: target WxH (a smaller one for a CPU smoke run)")
    p.add_argument("--frames", type=int, default=49, help="wan720p: frames per clip (1 + 4k)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch threads for CPU encoding (0: default)")
    p.add_argument("--work-dir", default=None, help="keep files here instead of a temporary folder")
    args = p.parse_args()

    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, cuda available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = bench_toy(args, work) if args.case == "toy" else bench_wan720p(args, work)
    print("results:", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
