"""--verify: forward probes that compare a converted model with its source, and the report of what was
written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_apt.config.model import MMDiTConfig
from megatron_apt.utils import get_logger
from megatron_apt.checkpoint.common import Echo, GENERATOR_KINDS, MAX_FORWARD_PARAMS, VerificationError, dtype_names, count_parameters
from megatron_apt.checkpoint.model_dir import instantiate, meta_model_args, read_model_state

log = get_logger("megatron_apt.checkpoint")

# ---- forward probes (--verify) -------------------------------------------------------------------------
def probe_inputs(cfg: MMDiTConfig, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = cfg.patch_size
    side = min(4, cfg.pos_embed_max_size)
    x = torch.randn(2, cfg.in_channels, pt, side * ph, side * pw, generator=g)
    t = torch.rand(2, generator=g)
    text = torch.randn(2, 5, cfg.text_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g) if cfg.pooled_dim else None
    return {"x": x, "t": t, "text": text, "pooled": pooled}


@torch.no_grad()
def probe_forward(model, kind: str, seed: int = 0) -> torch.Tensor:
    """One small fp32 CPU forward: G(z) for generators, v(x, t) for diffusion models, D's logit."""
    from megatron_apt.models.discriminator import OneStepGenerator

    cfg = model.config if hasattr(model, "config") else model.backbone.config
    i = probe_inputs(cfg, seed)
    model = model.float().eval()
    if kind in GENERATOR_KINDS:
        return OneStepGenerator(model)(i["x"], i["text"], pooled=i["pooled"])
    return model(i["x"], i["t"], i["text"], pooled=i["pooled"])


FORWARD_TOL = 1e-5


def forward_error(out: torch.Tensor, ref: torch.Tensor, tol: float = FORWARD_TOL) -> float:
    """max |out - ref|, raising above tol * (1 + max |ref|). Bit-identical weights can still give last-bit
    differences: CPU BLAS kernels pick code paths by memory alignment (mmap-ed safetensors vs fresh tensors)."""
    if not torch.isfinite(out).all():
        raise VerificationError("the forward pass gives non-finite values")
    err = (out.float() - ref.float()).abs().max().item()
    if not err <= tol * (1.0 + ref.abs().max().item()):
        raise VerificationError(f"the forward pass differs from the source model's by {err:.3e}")
    return err


def verify_dir(directory: Path, state: dict[str, torch.Tensor], echo: Echo, label: str,
                reference_model=None) -> None:
    """Reload a written model directory: tensors bit-identical, and (small models) a finite forward that
    equals the reference model's when one is given."""
    meta, back = read_model_state(directory)
    if set(back) != set(state):
        raise VerificationError(f"{label}: reloaded tensors differ in names")
    for k, v in state.items():
        if back[k].dtype != v.dtype or not torch.equal(back[k], v):
            raise VerificationError(f"{label}: reloaded tensor {k} differs from what was written")
    cfg, kind, layers, ratio = meta_model_args(meta, {k: v.shape for k, v in back.items()})
    n = count_parameters(back, cfg, kind, layers, ratio)
    msg = f"verify {label}: {len(back)} tensors reload bit-identical"
    if n <= MAX_FORWARD_PARAMS:
        model = instantiate(meta, back)
        out = probe_forward(model, kind)
        if not torch.isfinite(out).all():
            raise VerificationError(f"{label}: the forward pass gives non-finite values")
        msg += f"; CPU forward finite (|out| mean {out.abs().mean().item():.4g})"
        if reference_model is not None:
            err = forward_error(out, probe_forward(reference_model, kind))
            msg += f", max |out - source model's| = {err:.2e}"
    else:
        msg += f"; forward skipped ({n / 1e9:.1f}B parameters)"
    echo(msg)


# ---- reports -------------------------------------------------------------------------------------------
@dataclass
class Written:
    path: Path
    kind: str
    parameters: int
    tensors: int
    dtypes: list[str]
    note: str = ""

    def line(self) -> str:
        return (f"  {self.path}: kind {self.kind}, {self.parameters / 1e6:.3f}M parameters in {self.tensors} tensors, "
                f"dtypes {self.dtypes}" + (f"; {self.note}" if self.note else ""))


@dataclass
class Report:
    title: str
    outputs: list[Written] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [self.title, *(w.line() for w in self.outputs)]
        lines += [f"  changed: {c}" for c in self.changes]
        return "\n".join(lines)


def written(path: Path, state, meta, note: str = "") -> Written:
    cfg, kind, layers, ratio = meta_model_args(meta, {k: v.shape for k, v in state.items()})
    return Written(path, kind, count_parameters(state, cfg, kind, layers, ratio), len(state), dtype_names(state), note)
