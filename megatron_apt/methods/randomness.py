"""Per-sample randomness: noise, timesteps and dropout are drawn per sample from a generator seeded by
(seed, step, purpose, global sample position), so an update does not depend on how the samples of a global
batch are spread over ranks and micro-batches, and a resumed run draws exactly what an uninterrupted one
would have drawn."""

from __future__ import annotations

import torch

from megatron_apt.utils import sample_seed


def per_sample_randn(shape, seed: int, step: int, purpose: str, positions, device=None, dtype=torch.float32):
    """One standard-normal tensor of `shape` per global sample position, stacked. On a CUDA device each
    sample's tensor is drawn there, from a CUDA generator with the same per-sample seed (the values differ
    from the CPU's, but not with the layout); elsewhere on the CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gen_dev = dev if dev.type == "cuda" else torch.device("cpu")
    out = []
    for pos in positions:
        g = torch.Generator(device=gen_dev).manual_seed(sample_seed(seed, step, purpose, pos))
        out.append(torch.randn(shape, generator=g, device=gen_dev))
    return torch.stack(out).to(device=device, dtype=dtype)


def per_sample_rand(seed: int, step: int, purpose: str, positions, device=None, dtype=torch.float32):
    """One U(0, 1) scalar per global sample position (drawn in float64 on the CPU)."""
    out = []
    for pos in positions:
        g = torch.Generator().manual_seed(sample_seed(seed, step, purpose, pos))
        out.append(torch.rand((), generator=g, dtype=torch.float64))
    return torch.stack(out).to(device=device, dtype=dtype)
