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

:func:`write_toy_indexed` draws the same samples straight into an indexed data set (pixels and byte
tokens, the layout ``tools/preprocess_video.py --vae none --text-encoder none`` writes), without the mp4
round trip: fast enough for the hundreds of thousands of samples a toy diffusion model trains on.

Everything is a deterministic function of ``seed``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_apt.utils import cli_main

DIRECTIONS = ("left", "right", "up", "down")

# The embedded default task (examples/quickstart.sh, the shipped toy models): 24x24 canvases, 8 frames at
# 4 fps, one digit of 8-10 px per sample.
TOY_TASK = dict(size=24, frames=8, fps=4, min_digit=8, max_digit=10, max_digits=1)
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


_CHUNK = 4096  # samples per independently seeded chunk: the output does not depend on the worker count


def _render_chunk(args: tuple[ToyConfig, int, int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    cfg, chunk, n = args
    images, targets = _digits()
    rng = np.random.default_rng([cfg.seed, chunk])
    frames, labels = zip(*(render_sample(rng, images, targets, cfg) for _ in range(n)))
    return np.stack(frames), list(labels)


def render_arrays(cfg: ToyConfig, workers: int = 1):
    """``cfg.num`` samples as one ``uint8 [N, T, S, S, 3]`` array and their labels, drawn in chunks of
    4096 seeded by (seed, chunk) on ``workers`` processes (the result does not depend on ``workers``)."""
    jobs = [(cfg, c, min(_CHUNK, cfg.num - c * _CHUNK)) for c in range(-(-cfg.num // _CHUNK))]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), [lab for p in parts for lab in p[1]]


def write_toy_indexed(prefix: str | os.PathLike, cfg: ToyConfig, max_text_len: int = 32, workers: int = 1) -> dict:
    """Draw ``cfg.num`` toy samples straight into an indexed data set at ``prefix`` (uint8 pixels, byte
    token ids; what the preprocessor writes for the mp4/PNG files of :func:`make_toy_dataset`, minus the
    codec's rounding). Atomic: nothing is visible at ``prefix`` until the manifest is written."""
    from megatron_apt.data import indexed
    from megatron_apt.models.text_encoder import ByteTokenizer

    if cfg.num < 1:
        raise ValueError(f"num must be >= 1, got {cfg.num}")
    frames, labels = render_arrays(cfg, workers)
    tok = ByteTokenizer()
    fields = indexed.make_schema("pixels", "uint8", "ids", None)
    with indexed.DatasetWriter(prefix, fields) as writer:
        for i, (f, lab) in enumerate(zip(frames, labels)):
            ids = np.asarray(tok.encode(lab["caption"], max_text_len), dtype=np.int32)
            meta = {"caption": lab["caption"], "source": f"toy:{cfg.seed}:{i}", "input_index": i, "clip": 0,
                    "kind": "image" if cfg.images else "video", "frames": int(f.shape[0]),
                    "fps": None if cfg.images else float(cfg.fps), "extra": {k: v for k, v in lab.items()
                                                                              if k != "caption"}}
            writer.add(f, ids, meta)
        manifest = writer.commit({"settings": {"toy": {**cfg.__dict__}, "max_text_len": max_text_len,
                                               "tokenizer": tok.describe()}})
    return manifest


@cli_main  # an OSError (permission, a missing folder, a full disk): one line naming the path, status 2
def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    d = ToyConfig()
    p = argparse.ArgumentParser(description="Write the moving-digits toy video (or image) data set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", help="output folder (media files + captions)")
    p.add_argument("--num", type=int, default=d.num, help="number of videos/images")
    p.add_argument("--size", type=int, default=d.size, help="canvas width = height in pixels (even)")
    p.add_argument("--frames", type=int, default=d.frames, help="frames per video")
    p.add_argument("--fps", type=int, default=d.fps, help="frame rate of the videos")
    p.add_argument("--digit-size", default=f"{d.min_digit}-{d.max_digit}", help="digit size in pixels, N or MIN-MAX")
    p.add_argument("--max-digits", type=int, default=d.max_digits, choices=[1, 2], help="digits per sample: 1..N")
    p.add_argument("--images", action="store_true", help="write single-frame PNG images instead of videos")
    p.add_argument("--codec", default=d.codec, choices=["auto", "h264", "mpeg4"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--indexed", metavar="PREFIX", help="write an indexed data set (pixels + byte tokens) at PREFIX "
                   "instead of media files: no mp4 round trip, fast for large sets; --output is then unused")
    p.add_argument("--max-text-len", type=int, default=32, help="with --indexed: byte tokens kept per caption")
    p.add_argument("--workers", type=int, default=1, help="with --indexed: processes drawing the samples")
    args = p.parse_args(argv)
    try:
        lo, _, hi = args.digit_size.partition("-")
        min_digit, max_digit = int(lo), int(hi or lo)
    except ValueError:
        p.error(f"bad --digit-size {args.digit_size!r}: expected N or MIN-MAX, e.g. 12-14")
    if args.size % 2 and not args.images:
        p.error(f"--size must be even for videos (yuv420p), got {args.size}")
    if not args.output and not args.indexed:
        p.error("give --output DIR (media files) or --indexed PREFIX (an indexed data set)")
    t0 = time.perf_counter()
    if args.indexed:
        try:
            cfg = ToyConfig(num=args.num, size=args.size, frames=args.frames, fps=args.fps, min_digit=min_digit,
                            max_digit=max_digit, max_digits=args.max_digits, images=args.images, seed=args.seed)
            man = write_toy_indexed(args.indexed, cfg, args.max_text_len, args.workers)
        except ValueError as e:
            p.error(str(e))
        print(f"wrote {man['num_samples']} {'images' if args.images else 'videos'} to {args.indexed} in "
              f"{time.perf_counter() - t0:.1f} s")
        return 0
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
