"""Models with random weights, built on the target device (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import torch


# ------------------------------------------------------------------------------------------------------
# model builders (random weights, built on the target device)
# ------------------------------------------------------------------------------------------------------
def build_text_encoder(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int,
                       attn_implementation: str):
    """transformers' UMT5EncoderModel, random weights: built on the meta device, materialised directly on
    `device` in `dtype` (no CPU initialisation of ~5.7 B parameters), filled in place."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**shape, attn_implementation=attn_implementation)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.encoder.embed_tokens.weight = model.shared.weight  # to_empty unties them
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMS layer norms
                p.fill_(1.0)
            elif "relative_attention_bias" in name or name.endswith(("shared.weight", "embed_tokens.weight")):
                p.normal_(0.0, 1.0, generator=gen)
            else:  # Linear [out, in]: unit-variance outputs for unit-variance inputs
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    return model.eval().requires_grad_(False)


def build_vae(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKLWan(**shape)
    return vae.to(dtype=dtype).eval().requires_grad_(False)


def build_backbone(preset: str, device: torch.device, dtype: torch.dtype, seed: int):
    from megatron_apt.models import build_mmdit

    # zero_init=False: adaLN-Zero would leave gates and the output projection at zero, and tensor cores run
    # measurably faster on zeros (measured on one H200: 894 vs 788 TFLOP/s on an 8192^3 bf16 matmul)
    return build_mmdit(preset, device=device, dtype=dtype, seed=seed, zero_init=False)


def random_text(B: int, L: int, dim: int, valid: int | None, device, dtype, gen):
    text = torch.randn(B, L, dim, generator=gen, device=device).to(dtype)
    mask = None
    if valid is not None and valid < L:
        mask = torch.zeros(B, L, dtype=torch.bool, device=device)
        mask[:, :valid] = True
        text = text * mask[..., None]
    return text, mask
