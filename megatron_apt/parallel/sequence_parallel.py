"""Ulysses sequence parallel for the MMDiT: tokens are split across the sequence-parallel group, and an
all-to-all around the attention core trades the token split for a head split, so each rank attends over
the full sequence with 1/sp of the heads.

Both streams are split: visual tokens (their count must divide by sp) and text tokens (padded with masked
tokens up to a multiple of sp). megatron-core's own context parallel needs TransformerEngine, which these
clusters may lack; DeepSpeed's `DistributedAttention` wraps a single stream, while the joint attention
here moves two streams and a mask, so the all-to-all is written out (in `comm`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_apt.models.attention import attention
from megatron_apt.parallel import comm


class UlyssesAttentionCore(nn.Module):
    """Joint attention with inputs [B, L/sp, H_local, Dh] -> all-to-all -> [B, L, H_local/sp, Dh]."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, xq, xk, xv, cq, ck, cv, key_mask):
        g = self.group
        # sequence-split -> head-split (scatter heads dim 2, gather tokens dim 1)
        xq, xk, xv = (comm.all_to_all(t, 2, 1, g) for t in (xq, xk, xv))
        ck, cv = (comm.all_to_all(t, 2, 1, g) for t in (ck, cv))
        lx = xq.shape[1]
        q = xq if cq is None else torch.cat([xq, comm.all_to_all(cq, 2, 1, g)], 1)
        k, v = torch.cat([xk, ck], 1), torch.cat([xv, cv], 1)
        out = attention(q, k, v, key_mask)
        xo = comm.all_to_all(out[:, :lx], 1, 2, g)
        co = None if cq is None else comm.all_to_all(out[:, lx:], 1, 2, g)
        return xo, co


class SPSequenceShard(nn.Module):
    """Split visual tokens, text tokens and rotary tables across the sequence-parallel group."""

    def __init__(self, group):
        super().__init__()
        self.group = group
        self.size = dist.get_world_size(group)

    def _check_same_shapes(self, x, c):
        # Ranks of one sequence-parallel group must hold the same sample; differing shapes would hang the
        # all-to-all later, so fail here with the shapes of every rank.
        shape = torch.tensor([x.shape[0], x.shape[1], c.shape[1]], dtype=torch.long,
                             device=x.device if dist.get_backend(self.group) == "nccl" else "cpu")
        parts = [torch.empty_like(shape) for _ in range(self.size)]
        dist.all_gather(parts, shape, group=self.group)
        if any(not torch.equal(p, parts[0]) for p in parts):
            shapes = [tuple(p.tolist()) for p in parts]
            raise RuntimeError(
                f"sequence-parallel ranks got different inputs (batch, visual tokens, text tokens) = {shapes}; "
                "every rank of a sequence-parallel group must receive the same sample"
            )

    def forward(self, x_tokens, c_tokens, c_mask, cos, sin):
        n, g = self.size, self.group
        self._check_same_shapes(x_tokens, c_tokens)
        lx = x_tokens.shape[1]
        if lx % n:
            raise ValueError(
                f"{lx} visual tokens cannot be split over sequence-parallel size {n}; choose a size that divides "
                f"the token count (T' x H' x W') or change the resolution"
            )
        lc = c_tokens.shape[1]
        pad = (-lc) % n
        if pad:
            if c_mask is None:
                c_mask = torch.ones(c_tokens.shape[:2], dtype=torch.bool, device=c_tokens.device)
            c_tokens = F.pad(c_tokens, (0, 0, 0, pad))
            c_mask = F.pad(c_mask, (0, pad), value=False)
        x_loc = comm.split(x_tokens, 1, g)
        c_loc = comm.split(c_tokens, 1, g)
        if cos is not None:
            r = dist.get_rank(g)
            cos, sin = cos.chunk(n, 0)[r], sin.chunk(n, 0)[r]
        return x_loc, c_loc, c_mask, cos, sin


class SPSequenceGather(nn.Module):
    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x_tokens):
        return comm.gather(x_tokens, 1, self.group)


class SPHeadAttentionCore(nn.Module):
    """The discriminator heads' attention when the visual tokens are split across ranks: each rank attends
    over its tokens, then the partial softmaxes are merged by their log-sum-exp (as flash-decoding merges
    key blocks), so the softmax spans every rank's tokens. Only [B, H] scalars and one token move."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, q, k, v):
        from megatron_apt.models.attention import attention_with_lse

        out, lse = attention_with_lse(q, k, v)  # [B, 1, H, Dh], [B, H, 1]
        lse_all = comm.gather(lse.unsqueeze(0), 0, self.group)  # [sp, B, H, 1]
        weight = torch.exp(lse - torch.logsumexp(lse_all, dim=0))  # this rank's share of the softmax mass
        return comm.all_reduce(out * weight.transpose(1, 2)[..., None].to(out.dtype), self.group)
