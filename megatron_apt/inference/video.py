"""Writing videos [C, T, H, W] in [-1, 1] to mp4 with PyAV (h264, yuv420p), atomically."""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from megatron_apt.inference.grid import to_uint8


def write_mp4(video: torch.Tensor, path: str | Path, fps: float = 24, crf: int = 18) -> Path:
    """video [C, T, H, W] in [-1, 1]. Odd sizes are padded by one pixel (yuv420p needs even sizes)."""
    frames = to_uint8(video[None])[0]  # [T, H, W, 3]
    T, H, W, _ = frames.shape
    ph, pw = H % 2, W % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4") as out:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf)}
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode all frames as uint8 [T, H, W, 3]."""
    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
