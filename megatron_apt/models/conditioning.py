"""Text conditioning shared by training and sampling: the null text, padding, the doubled CFG batch."""

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
