"""PNG grids of samples [B, C, T, H, W] (values in [-1, 1]); frames laid out left to right per sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megatron_apt.utils import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3] (1 channel is repeated, >3 keeps the first 3)."""
    x = x.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1, 1)
    x = x[:, :3]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).numpy()


def make_grid(x: torch.Tensor, max_frames: int = 8, pad: int = 1) -> np.ndarray:
    frames = to_uint8(x)
    B, T, H, W, _ = frames.shape
    T = min(T, max_frames)
    grid = np.full((B * (H + pad) + pad, T * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for b in range(B):
        for t in range(T):
            y0, x0 = pad + b * (H + pad), pad + t * (W + pad)
            grid[y0:y0 + H, x0:x0 + W] = frames[b, t]
    return grid


def save_grid(x: torch.Tensor, path: str | Path, max_frames: int = 8, scale: int = 1) -> Path:
    img = Image.fromarray(make_grid(x, max_frames))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    with atomic_write(path, "wb") as f:
        img.save(f, format="PNG")
    return path
