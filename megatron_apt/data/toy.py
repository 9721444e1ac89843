"""A tiny, label-rich text-to-video data set built from scikit-learn's handwritten digits.

Each video shows one or two 8x8 digits from ``sklearn.datasets.load_digits`` (the data ships
inside scikit-learn: nothing is downloaded), upscaled to 12-14 px, moving in a straight line
left/right/up/down across a dark canvas, and is written as a real mp4 (H.264, or MPEG-4 Part 2 when
libx264 is missing; yuv420p) with a caption file next to it::

    toy_00000.mp4   toy_00000.txt  "the digit 3 moving left"
    toy_00001.mp4   toy_00001.txt  "the digit 5 moving up and the digit 0 moving right"

``metadata.jsonl`` holds one line per file with the labels (``digits``, ``directions``, start and
end positions) and can be fed to the preprocessor as a JSONL input directly: its extra keys are
carried into every sample's metadata, so evaluation can check that generated videos show the
right digits moving the right way.

With ``images=True`` single frames are written as PNG instead, captioned "the digit 3" /
"the digits 3 and 7".

Everything is a deterministic function of ``seed``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards


@dataclass(frozen=True)
class ToyConfig:
    num: int = 512
    size: int = 32  # canvas width = height, pixels
    frames: int = 16
    fps: int = 8
    min_digit: int = 12  # digit size range in pixels (upscaled from 8x8)
    max_digit: int = 14
    max_digits: int = 2
    images: bool = False
    seed: int = 0
    codec: str = "auto"  # auto | h264 | mpeg4
    prefix: str = "toy"


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _sprite(img8: np.ndarray, size: int) -> np.ndarray:
    """Upscale an 8x8 digit in [0, 1] to ``size x size`` float32 with bilinear filtering."""
    from PIL import Image

    im = Image.fromarray(np.round(img8 * 255).astype(np.uint8))  # 2-d uint8: mode L
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def caption_for(digits: list[int], directions: list[str] | None) -> str:
    if directions is None:
        if len(digits) == 1:
            return f"the digit {digits[0]}"
        return "the digits " + " and ".join(str(d) for d in digits)
    return " and ".join(f"the digit {d} moving {m}" for d, m in zip(digits, directions))


def _trajectory(
    rng: np.random.Generator, direction: str, size: int, sprite: int, frames: int, lane: int = 0, lanes: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left positions ``[frames, 2]`` (x, y) of a sprite moving ``direction``, inside the canvas.

    The digit travels between 60% and 100% of the free room, so motion is always clearly visible.
    Across its motion it stays in lane ``lane`` of ``lanes`` (two digits moving the same way do not
    overlap).
    """
    room = size - sprite
    dx, dy = _STEP[direction]
    travel = rng.uniform(0.6, 1.0) * room
    along0 = rng.uniform(0, room - travel)
    across = (lane + rng.uniform(0, 1)) * room / lanes
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    along = along0 + travel * t
    if dx < 0 or dy < 0:
        along = room - along  # moving left/up: start at the far side
    if dx != 0:
        return np.stack([along, np.full_like(along, across)], 1), np.array([dx, dy])
    return np.stack([np.full_like(along, across), along], 1), np.array([dx, dy])


def render_sample(
    rng: np.random.Generator, images: np.ndarray, targets: np.ndarray, cfg: ToyConfig
) -> tuple[np.ndarray, dict[str, Any]]:
    """One sample: ``uint8 [T, S, S, 3]`` frames (T = 1 for images) and its labels."""
    n_digits = int(rng.integers(1, cfg.max_digits + 1))
    n_frames = 1 if cfg.images else cfg.frames
    background = float(rng.uniform(0.0, 0.12))
    canvas = np.full((n_frames, cfg.size, cfg.size), background, np.float32)
    digits, directions, starts, ends, sizes = [], [], [], [], []
    lanes = rng.permutation(n_digits)
    for d_i in range(n_digits):
        k = int(rng.integers(len(images)))
        size = int(rng.integers(cfg.min_digit, cfg.max_digit + 1))
        sprite = _sprite(images[k], size) * float(rng.uniform(0.75, 1.0))
        direction = DIRECTIONS[int(rng.integers(4))]
        pos, _ = _trajectory(rng, direction, cfg.size, size, n_frames, lane=int(lanes[d_i]), lanes=n_digits)
        for f in range(n_frames):
            x, y = (int(round(v)) for v in pos[f])
            region = canvas[f, y : y + size, x : x + size]
            np.maximum(region, sprite, out=region)
        digits.append(int(targets[k]))
        directions.append(direction)
        starts.append([round(float(v), 3) for v in pos[0]])
        ends.append([round(float(v), 3) for v in pos[-1]])
        sizes.append(size)
    frames = np.repeat(np.round(canvas * 255).astype(np.uint8)[..., None], 3, axis=3)
    labels = {
        "digits": digits,
        "directions": None if cfg.images else directions,
        "start_xy": starts,
        "end_xy": None if cfg.images else ends,
        "digit_size": sizes,
        "caption": caption_for(digits, None if cfg.images else directions),
    }
    return frames, labels


def _pick_codec(codec: str) -> str:
    import av

    if codec == "auto":
        return "libx264" if "libx264" in av.codecs_available else "mpeg4"
    if codec == "h264":
        return "libx264"
    if codec not in ("libx264", "mpeg4"):
        raise ValueError(f"codec must be auto, h264 or mpeg4, got {codec!r}")
    return codec


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, codec: str = "auto") -> None:
    """Write ``uint8 [T, H, W, 3]`` frames as an mp4 (yuv420p). H and W must be even."""
    import av

    codec = _pick_codec(codec)
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {w}x{h}")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            # Near-lossless, single-threaded (tiny frames; keeps the output reproducible).
            stream.options = {"crf": "12", "preset": "veryfast", "threads": "1"}
        else:
            stream.bit_rate = 2_000_000
            stream.codec_context.thread_count = 1
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_toy_dataset(out_dir: str | os.PathLike, cfg: ToyConfig | None = None, **overrides: Any) -> Path:
    """Write the toy data set into ``out_dir``; returns the path of its ``metadata.jsonl``."""
    cfg = cfg or ToyConfig()
    if overrides:
        cfg = ToyConfig(**{**cfg.__dict__, **overrides})
    if cfg.num < 1:
        raise ValueError(f"num must be >= 1, got {cfg.num}")
    if not 1 <= cfg.max_digits <= 2:
        raise ValueError(f"max_digits must be 1 or 2, got {cfg.max_digits}")
    if not 1 <= cfg.min_digit <= cfg.max_digit <= cfg.size:
        raise ValueError(f"need 1 <= min_digit <= max_digit <= size, got {cfg.min_digit}, {cfg.max_digit}, {cfg.size}")
    if not cfg.images and (cfg.frames < 1 or cfg.fps < 1):
        raise ValueError("frames and fps must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, targets = _digits()
    rng = np.random.default_rng(cfg.seed)
    ext = ".png" if cfg.images else ".mp4"
    records = []
    for i in range(cfg.num):
        frames, labels = render_sample(rng, images, targets, cfg)
        name = f"{cfg.prefix}_{i:05d}"
        media = out / f"{name}{ext}"
        if cfg.images:
            from PIL import Image

            Image.fromarray(frames[0]).save(media)
        else:
            write_mp4(media, frames, cfg.fps, cfg.codec)
        (out / f"{name}.txt").write_text(labels["caption"] + "\n", encoding="utf-8")
        records.append({"path": media.name, "kind": "image" if cfg.images else "video", **labels})
    meta = out / "metadata.jsonl"
    with open(meta, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    info = {**cfg.__dict__, "codec": "png" if cfg.images else _pick_codec(cfg.codec), "count": len(records)}
    (out / "toy_config.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    d = ToyConfig()
    p = argparse.ArgumentParser(description="Write the moving-digits toy video (or image) data set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--num", type=int, default=d.num, help="number of videos/images")
    p.add_argument("--size", type=int, default=d.size, help="canvas width = height in pixels (even)")
    p.add_argument("--frames", type=int, default=d.frames, help="frames per video")
    p.add_argument("--fps", type=int, default=d.fps, help="frame rate of the videos")
    p.add_argument("--digit-size", default=f"{d.min_digit}-{d.max_digit}", help="digit size in pixels, N or MIN-MAX")
    p.add_argument("--max-digits", type=int, default=d.max_digits, choices=[1, 2], help="digits per sample: 1..N")
    p.add_argument("--images", action="store_true", help="write single-frame PNG images instead of videos")
    p.add_argument("--codec", default=d.codec, choices=["auto", "h264", "mpeg4"])
    p.add_argument("--seed", type=int, default=d.seed)
    args = p.parse_args(argv)
    try:
        lo, _, hi = args.digit_size.partition("-")
        min_digit, max_digit = int(lo), int(hi or lo)
    except ValueError:
        p.error(f"bad --digit-size {args.digit_size!r}: expected N or MIN-MAX, e.g. 12-14")
    if args.size % 2 and not args.images:
        p.error(f"--size must be even for videos (yuv420p), got {args.size}")
    t0 = time.perf_counter()
    try:
        meta = make_toy_dataset(
            args.output,
            ToyConfig(num=args.num, size=args.size, frames=args.frames, fps=args.fps, min_digit=min_digit,
                      max_digit=max_digit, max_digits=args.max_digits, images=args.images, seed=args.seed,
                      codec=args.codec),
        )
    except ValueError as e:
        p.error(str(e))
    kind = "images" if args.images else "videos"
    print(f"wrote {args.num} {kind} to {args.output} in {time.perf_counter() - t0:.1f} s "
          f"(labels: {meta})")
    return 0
