#!/usr/bin/env python
"""Checkpoint conversions.

  import-diffusers  a diffusers SD3Transformer2DModel directory -> a megatron_apt model directory
  export-diffusers  an SD3-configured megatron_apt model directory -> a diffusers SD3Transformer2DModel dir

Writes are atomic (a killed conversion leaves nothing that looks complete), inputs are never modified,
and only safetensors / JSON are read (nothing is unpickled).
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

import torch


def _summary(model, what: str) -> None:
    n = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    cfg = model.config
    print(f"{what}: {n / 1e6:.2f}M parameters, dtypes {dtypes}, {cfg.num_layers} layers, "
          f"hidden {cfg.hidden_size}, heads {cfg.num_heads}, qk_norm={cfg.qk_norm}")


def _sd3_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = min(8, cfg.pos_embed_max_size) * cfg.patch_size[1]
    x = torch.randn(2, cfg.in_channels, 1, side, side, generator=g)
    t = torch.rand(2, generator=g)
    text = torch.randn(2, 7, cfg.text_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g) if cfg.pooled_dim else None
    return x, t, text, pooled


def verify_against_diffusers(model, diffusers_dir: str, tol: float = 1e-4) -> float:
    """Run our model and diffusers' on the same random inputs (fp32) and return max |difference|."""
    from diffusers import SD3Transformer2DModel

    ref = SD3Transformer2DModel.from_pretrained(diffusers_dir, torch_dtype=torch.float32).eval()
    model = model.float().eval()
    x, t, text, pooled = _sd3_inputs(model.config)
    with torch.no_grad():
        ours = model(x, t, text, pooled=pooled)[:, :, 0]
        theirs = ref(hidden_states=x[:, :, 0], encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=t * 1000.0, return_dict=False)[0]
    err = (ours - theirs).abs().max().item()
    print(f"verify: max |ours - diffusers| = {err:.3e} (tolerance {tol:g})")
    if not err <= tol:
        raise SystemExit(f"verification failed: outputs differ by {err:.3e} > {tol:g}")
    return err


def cmd_import_diffusers(a) -> None:
    from megatron_apt.checkpoint.diffusers_sd3 import import_diffusers
    from megatron_apt.models import load_mmdit

    model = import_diffusers(a.input, a.output, overwrite=a.overwrite)
    _summary(model, f"imported {a.input} -> {a.output}")
    if a.verify:
        verify_against_diffusers(load_mmdit(a.output), a.input)


def cmd_export_diffusers(a) -> None:
    from megatron_apt.checkpoint.diffusers_sd3 import export_diffusers
    from megatron_apt.models import load_mmdit

    model = load_mmdit(a.input)
    export_diffusers(model, a.output, overwrite=a.overwrite)
    _summary(model, f"exported {a.input} -> {a.output}")
    if a.verify:
        verify_against_diffusers(model, a.output)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in [
        ("import-diffusers", cmd_import_diffusers, "diffusers SD3Transformer2DModel dir -> model dir"),
        ("export-diffusers", cmd_export_diffusers, "SD3-configured model dir -> diffusers dir"),
    ]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--input", required=True)
        s.add_argument("--output", required=True)
        s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        s.add_argument("--verify", action="store_true", help="reload and compare outputs with diffusers (fp32)")
        s.set_defaults(fn=fn)
    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
