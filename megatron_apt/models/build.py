"""Building models from the size registry (`config.model.MODEL_PRESETS`)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_apt.config.model import MMDiTConfig, get_model_config
from megatron_apt.models.mmdit import MMDiT


def build_mmdit(name_or_config: str | MMDiTConfig | dict[str, Any], device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int | None = 0, zero_init: bool = True,
                **overrides: Any) -> MMDiT:
    """Build an MMDiT from a preset name ('debug', 'toy', '2b', '8b', 'sd3.5-large'), a dict or a config.

    On device='meta' no memory is allocated (parameter counting, planning). Otherwise weights are
    initialised deterministically from `seed` (adaLN-Zero when zero_init)."""
    cfg = get_model_config(name_or_config, **overrides)
    device = torch.device(device)
    with torch.device(device):
        model = MMDiT(cfg)
    if device.type != "meta":
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(zero_init=zero_init, generator=gen)
    return model.to(dtype=dtype)
