"""Samplers over a velocity model v(x, t) (flow matching: x_t = (1 - t) x0 + t eps, v = eps - x0, x0 = x_t - t v).

* `euler`: the diffusion model's ODE, t_0 = 1 > ... > t_N = 0, optionally with classifier-free guidance
  against an unconditional text (the null text or an encoded negative prompt), at every step or only at the
  steps whose t lies in a guidance interval.
* `renoise`: few-step sampling of a one-step model (the APT generator, or a consistency model): at each t_k
  the model's sample prediction x0 = x - t_k v(x, t_k) (for the generator at t = 1 this is exactly
  G(z) = z - G-hat(z, T), Eq. 5), re-noised with fresh noise to t_{k+1}: x = (1 - t_{k+1}) x0 + t_{k+1} eps.
  With timesteps [1, 0] it is the one-step generator; [1, t, 0] is the paper's zero-shot two-step inference
  (§3.5) with the intermediate t configurable.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_apt.models.conditioning import FULL_INTERVAL, guidance_scale, guided_velocity

Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def check_timesteps(timesteps: Sequence[float]) -> list[float]:
    ts = [float(t) for t in timesteps]
    if len(ts) < 2 or ts[0] != 1.0 or ts[-1] != 0.0 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must decrease strictly from 1 to 0, got {ts}")
    return ts


def euler(velocity: Velocity, z: torch.Tensor, timesteps: Sequence[float], cfg_scale: float = 1.0,
          uncond_velocity: Velocity | None = None, guidance_interval=FULL_INTERVAL) -> torch.Tensor:
    """Euler steps of dx/dt = v from t = 1 to 0; cfg_scale != 1 mixes v_u + s (v_c - v_u) at the steps whose t
    lies in guidance_interval (lo, hi] (the unconditional pass is skipped at the others)."""
    x = z
    ts = check_timesteps(timesteps)
    if cfg_scale != 1.0 and uncond_velocity is None:
        raise ValueError("classifier-free guidance needs the unconditional velocity")
    for a, b in zip(ts, ts[1:]):
        v = velocity(x, a)
        s = guidance_scale(cfg_scale, a, guidance_interval)
        if s != 1.0:  # no unconditional pass where no guidance applies
            v = guided_velocity(v, uncond_velocity(x, a), s)
        x = x + (b - a) * v
    return x


def renoise(velocity: Velocity, z: torch.Tensor, timesteps: Sequence[float],
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Predict x0 at each t_k and re-noise it to t_{k+1} with fresh standard-normal noise (drawn from
    `generator` on the CPU, so a seed gives the same samples on every device)."""
    x = z
    ts = check_timesteps(timesteps)
    for a, b in zip(ts, ts[1:]):
        x0 = x - a * velocity(x, a)
        if b > 0:
            eps = torch.randn(x0.shape, generator=generator).to(x0)
            x = (1 - b) * x0 + b * eps
        else:
            x = x0
    return x
