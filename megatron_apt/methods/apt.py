"""Adversarial post-training: the losses of the paper (Eqs. 1, 2, 6-10), written for numerical stability.

  L_D = E[-log sigma(D(x))] + E[-log(1 - sigma(D(G(z))))] + lambda E[(D(x) - D(x + sigma eps))^2]   (Eq. 10)
  L_G = E[-log sigma(D(G(z)))]                                                                     (Eq. 2)
  -log sigma(a) = softplus(-a),   -log(1 - sigma(a)) = softplus(a)
  D(x, c) = D_hat(x, t, c), t ~ shift(U(0, 1), s), shift(t, s) = s t / (1 + (s - 1) t)               (Eqs. 6-7)

The paper writes the perturbation as N(x, sigma I) and calls sigma a "small variance" (§3.4): read
literally, the perturbed sample is x + sqrt(sigma) eps, eps ~ N(0, I) (`r1_sigma_means="variance"`, the
default); `"std"` reads sigma as the standard deviation (x + sigma eps). Either way
aR1 / std^2 -> ||grad_x D||^2 (the exact R1 of Eq. 8) as the noise shrinks.

Randomness (z, t, eps) comes from a `torch.Generator` that the caller seeds identically on every rank that
shares a sample (a tensor- or sequence-parallel group), so those ranks draw the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class APTConfig:
    """Hyper-parameters of one APT stage (defaults: the paper's image stage, §3.5)."""

    r1_lambda: float = 100.0
    """Weight lambda of the approximated R1 term (paper: 100)."""
    r1_sigma: float = 0.01
    """sigma of the aR1 perturbation N(x, sigma I) (Eq. 9; paper: 0.01 images, 0.1 videos)."""
    r1_sigma_means: str = "variance"
    """How sigma is read: 'variance' (the paper's words, noise std sqrt(sigma)) or 'std' (noise std sigma)."""
    timestep_shift: float = 1.0
    """Shift s of the discriminator's timestep ensemble (paper: 1 images, 12 videos)."""
    use_r1: bool = True
    """Disable only for the ablation of the paper's Fig. 5 (the discriminator collapses without it)."""
    fused_d_forward: bool = True
    """Run D on [real, perturbed real, fake] as one batch (one parameter gather under ZeRO-3)."""

    def __post_init__(self):
        self.validate()

    def validate(self):
        if not self.r1_sigma > 0:
            raise ValueError(f"r1_sigma must be > 0, got {self.r1_sigma}")
        if self.r1_sigma_means not in ("variance", "std"):
            raise ValueError(f"r1_sigma_means must be 'variance' or 'std', got {self.r1_sigma_means!r}")
        if not self.r1_lambda >= 0:
            raise ValueError(f"r1_lambda must be >= 0, got {self.r1_lambda}")
        if not self.timestep_shift > 0:
            raise ValueError(f"timestep_shift must be > 0, got {self.timestep_shift}")


def r1_noise_std(cfg: APTConfig) -> float:
    """The standard deviation of the aR1 perturbation N(x, sigma I) (Eq. 9) under the configured reading."""
    return math.sqrt(cfg.r1_sigma) if cfg.r1_sigma_means == "variance" else cfg.r1_sigma


def perturb(x: torch.Tensor, eps: torch.Tensor, cfg: APTConfig) -> torch.Tensor:
    """A sample of N(x, sigma I) (Eq. 9) from standard-normal eps."""
    return x + r1_noise_std(cfg) * eps


def shift_timestep(t: torch.Tensor, s: float) -> torch.Tensor:
    """Eq. 7: shift(t, s) = s t / (1 + (s - 1) t); s > 1 moves t toward 1 (more noise)."""
    if not s > 0:
        raise ValueError(f"shift must be > 0, got {s}")
    return s * t / (1 + (s - 1) * t)


def sample_timesteps(batch: int, s: float, generator: torch.Generator | None = None, device=None,
                     dtype=torch.float32) -> torch.Tensor:
    """One discriminator timestep per sample: t ~ shift(U(0, 1), s) (Eq. 6 with a single draw)."""
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return shift_timestep(u, s).to(dtype)


def d_adversarial_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 1 with the non-saturating f_D, f_G: mean softplus(-D(x)) + mean softplus(D(G(z)))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 2 non-saturating: mean softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).mean()


def approx_r1(real_logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 9 per batch: mean (D(x) - D(x + sigma eps))^2 (the logits are scalars per sample)."""
    return (real_logits - perturbed_logits).pow(2).mean()


def exact_r1(discriminator, x: torch.Tensor, t: torch.Tensor, text, text_mask=None, pooled=None) -> torch.Tensor:
    """Eq. 8: mean over samples of ||grad_x D(x, t, c)||^2 by double backward (small models only: it needs
    second derivatives, which activation checkpointing and fused kernels do not provide)."""
    x = x.detach().requires_grad_(True)
    logits = discriminator(x, t, text, text_mask, pooled)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def _rep(v, n):
    return None if v is None else torch.cat([v] * n, dim=0)


def _reduce(v: torch.Tensor, reduction: str) -> torch.Tensor:
    return v.sum() if reduction == "sum" else v.mean()


def fused_d_inputs(x, perturbed, fake, t_real, t_fake, text, text_mask=None, pooled=None, *, use_r1: bool):
    """One D batch [real, perturbed real (same t), fake] (without aR1: [real, fake]): (x, t, text, mask, pooled)."""
    if use_r1:
        return (torch.cat([x, perturbed, fake]), torch.cat([t_real, t_real, t_fake]), _rep(text, 3),
                _rep(text_mask, 3), _rep(pooled, 3))
    return torch.cat([x, fake]), torch.cat([t_real, t_fake]), _rep(text, 2), _rep(text_mask, 2), _rep(pooled, 2)


def split_fused_logits(logits, batch: int, *, use_r1: bool):
    """(real, perturbed or None, fake) logits of a `fused_d_inputs` batch."""
    if use_r1:
        real_l, pert_l, fake_l = logits.split(batch)
        return real_l, pert_l, fake_l
    real_l, fake_l = logits.split(batch)
    return real_l, None, fake_l


def discriminator_loss_from_logits(real_l, fake_l, pert_l=None, *, cfg: APTConfig, reduction: str = "mean"):
    """Eq. 10 from D's logits on real, fake and (with aR1) perturbed real samples: (loss, metrics)."""
    adv = _reduce(F.softplus(-real_l) + F.softplus(fake_l), reduction)
    r1 = _reduce((real_l - pert_l).pow(2), reduction) if pert_l is not None else torch.zeros((), device=real_l.device)
    loss = adv + (cfg.r1_lambda * r1 if cfg.use_r1 else 0.0)
    metrics = {
        "d_loss": loss.detach(),
        "d_adv": adv.detach(),
        "ar1": r1.detach(),
        "logit_real": real_l.detach().mean(),
        "logit_fake": fake_l.detach().mean(),
        "logit_gap": (real_l.detach().mean() - fake_l.detach().mean()),
        "d_acc": 0.5 * ((real_l.detach() > 0).float().mean() + (fake_l.detach() < 0).float().mean()),
    }
    return loss, metrics


def discriminator_loss(D, G, x, text, text_mask=None, pooled=None, *, cfg: APTConfig,
                       generator: torch.Generator | None = None, z: torch.Tensor | None = None,
                       t_real: torch.Tensor | None = None, t_fake: torch.Tensor | None = None,
                       eps: torch.Tensor | None = None, reduction: str = "mean"):
    """L_D of Eq. 10 for one micro-batch; G runs under no_grad. Returns (loss, metrics).

    z, t_real, t_fake and eps are drawn from `generator` unless given (the trainer draws them per sample).
    reduction='sum' sums the per-sample losses (the trainer normalises by the global batch)."""
    B = x.shape[0]
    if z is None:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        fake = G(z, text, text_mask, pooled).detach().to(x.dtype)
    if t_real is None:
        t_real = sample_timesteps(B, cfg.timestep_shift, generator, x.device, x.dtype)
    if t_fake is None:
        t_fake = sample_timesteps(B, cfg.timestep_shift, generator, x.device, x.dtype)
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    perturbed = perturb(x, eps, cfg)  # same t as the real sample it perturbs
    if cfg.fused_d_forward:
        logits = D(*fused_d_inputs(x, perturbed, fake, t_real, t_fake, text, text_mask, pooled, use_r1=cfg.use_r1))
        real_l, pert_l, fake_l = split_fused_logits(logits, B, use_r1=cfg.use_r1)
    else:
        real_l = D(x, t_real, text, text_mask, pooled)
        fake_l = D(fake, t_fake, text, text_mask, pooled)
        pert_l = D(perturbed, t_real, text, text_mask, pooled) if cfg.use_r1 else None
    return discriminator_loss_from_logits(real_l, fake_l, pert_l, cfg=cfg, reduction=reduction)


def generator_loss(D, G, text, text_mask=None, pooled=None, *, shape, cfg: APTConfig,
                   generator: torch.Generator | None = None, z: torch.Tensor | None = None, device=None,
                   dtype=torch.float32, t: torch.Tensor | None = None, reduction: str = "mean"):
    """L_G of Eq. 2 for one micro-batch; gradients flow through D into G (the caller freezes D's
    parameters). Returns (loss, metrics, fake)."""
    if z is None:
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    fake = G(z, text, text_mask, pooled)
    if t is None:
        t = sample_timesteps(shape[0], cfg.timestep_shift, generator, z.device, z.dtype)
    fake_l = D(fake, t.to(fake.dtype), text, text_mask, pooled)
    loss = _reduce(F.softplus(-fake_l), reduction)
    return loss, {"g_loss": loss.detach(), "logit_fake_g": fake_l.detach().mean()}, fake
