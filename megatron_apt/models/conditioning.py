"""Text conditioning shared by training and sampling: the null text, padding, the doubled CFG batch, and the
guided velocity of classifier-free guidance (with an optional guidance interval)."""

from __future__ import annotations

import torch


def null_text(text, mask):
    """The unconditional text: zeros, fully masked (text dropout and classifier-free guidance)."""
    return torch.zeros_like(text), torch.zeros_like(mask)


def pad_text(text, mask, length: int):
    """Text features [B, L, D] and mask [B, L] padded (zeros, masked) to `length` tokens."""
    extra = length - text.shape[1]
    if extra <= 0:
        return text, mask
    return (torch.cat([text, text.new_zeros(text.shape[0], extra, text.shape[2])], 1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1))


def cfg_text_batch(text, mask, negative=None):
    """[conditional; unconditional] text for one doubled CFG batch. The unconditional half is the encoded
    negative prompt (features [1, Ln, D], mask [1, Ln]) for every sample, or the null text when there is none;
    both halves are padded to one length."""
    if negative is None:
        nt, nm = null_text(text, mask)
    else:
        nf, nmask = negative
        nt = nf.to(device=text.device, dtype=text.dtype).expand(text.shape[0], -1, -1)
        nm = nmask.to(text.device).expand(text.shape[0], -1)
    L = max(text.shape[1], nt.shape[1])
    (text, mask), (nt, nm) = pad_text(text, mask, L), pad_text(nt, nm, L)
    return torch.cat([text, nt]), torch.cat([mask, nm])


FULL_INTERVAL = (0.0, 1.0)


def check_guidance_interval(interval) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo < hi <= 1, as floats; a clear error naming the values otherwise."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval must be two numbers (lo, hi), got {interval!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= lo < hi <= 1, got ({lo:g}, {hi:g})")
    return lo, hi


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """'LO-HI' (e.g. '0-0.5') as a checked (lo, hi)."""
    lo, sep, hi = text.partition("-")
    if not sep:
        raise ValueError(f"guidance interval {text!r}: expected LO-HI, e.g. 0-0.5")
    return check_guidance_interval((lo, hi))


def guidance_scale(scale: float, t, interval=FULL_INTERVAL):
    """The classifier-free guidance scale at noise level t: `scale` for t in (lo, hi] of `interval`, 1 (the
    conditional velocity alone) outside it. The paper's guidance is constant over t (the full interval, the
    default). A limited interval (Kynkaenniemi et al., 2024, "Applying guidance in a limited interval improves
    sample and distribution quality") leaves out the high noise levels, where a large scale pushes a
    pixel-space toy model's samples past the data (saturated blobs) instead of toward the prompt. `t` is a
    float (a float comes back) or a per-sample tensor [B] (a tensor [B] comes back)."""
    lo, hi = interval
    if not torch.is_tensor(t):
        return scale if lo < t <= hi else 1.0
    return 1.0 + (scale - 1.0) * ((t > lo) & (t <= hi)).to(t.dtype)


def guided_velocity(vc, vu, s):
    """vu + s (vc - vu), with s a float or a per-sample tensor [B] from `guidance_scale`; vc, vu are [B, ...]."""
    if torch.is_tensor(s):
        s = s.to(vc.dtype).view(-1, *([1] * (vc.dim() - 1)))
    return vu + s * (vc - vu)
