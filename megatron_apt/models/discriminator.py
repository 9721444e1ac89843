"""The APT generator wrapper and discriminator (paper §3.2-3.3, Eq. 5, Fig. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_apt.config.model import DiscriminatorConfig
from megatron_apt.models.attention import RMSNorm, attention_with_lse
from megatron_apt.models.mmdit import MLP, MMDiT


class OneStepGenerator(nn.Module):
    """G(z, c) = z - G_hat(z, c, T) (Eq. 5): the backbone always sees the final timestep T (t = 1)."""

    def __init__(self, backbone: MMDiT):
        super().__init__()
        self.backbone = backbone

    @property
    def config(self):
        return self.backbone.config

    @staticmethod
    def timestep(z):
        """G always feeds the final timestep T (t = 1) to its backbone (§3.2)."""
        return torch.ones(z.shape[0], device=z.device, dtype=z.dtype)

    @staticmethod
    def output(z, v):
        """Eq. 5: the sample z - G-hat(z, c, T) from the backbone's velocity."""
        return z - v

    def forward(self, z, text, text_mask=None, pooled=None):
        return self.output(z, self.backbone(z, self.timestep(z), text, text_mask, pooled))


class HeadAttentionCore(nn.Module):
    """Attention of the head's query token over the visual tokens; returns the output [B, 1, H, Dh].
    Sequence parallel swaps it for a version that combines partial softmaxes across ranks."""

    def forward(self, q, k, v):
        out, _lse = attention_with_lse(q, k, v)
        return out


class CrossAttentionHead(nn.Module):
    """A cross-attention-only transformer block (Fig. 1, green): one learnable query token attends to all
    visual tokens of a backbone layer, then an MLP; yields one token [B, D].

    As drawn in Fig. 1: pre-RMSNorm on the query token and on the visual tokens, projections Q/K/V, per-head
    QK RMSNorm, attention, projection O and a residual; then pre-RMSNorm, MLP (Linear, GELU, Linear) and a
    residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_kv = RMSNorm(dim, eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.to_out = nn.Linear(dim, dim)
        self.norm_mlp = RMSNorm(dim, eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.core = HeadAttentionCore()

    def forward(self, tokens):
        B = tokens.shape[0]
        q0 = self.query.expand(B, -1, -1).to(tokens.dtype)
        kv = self.norm_kv(tokens)
        # unflatten to the local head count: correct whether or not tensor parallel split the projections
        hd = self.q_norm.weight.shape[0]
        q = self.q_norm(self.to_q(self.norm_q(q0)).unflatten(-1, (-1, hd)))
        k = self.k_norm(self.to_k(kv).unflatten(-1, (-1, hd)))
        v = self.to_v(kv).unflatten(-1, (-1, hd))
        h = q0 + self.to_out(self.core(q, k, v).flatten(-2))
        h = h + self.mlp(self.norm_mlp(h))
        return h[:, 0]


# Parameter names of the heads before they followed Fig. 1 (LayerNorm pre-norms with biases, no QK norm);
# checkpoints holding them are refused by name (see `check_head_layout`).
LEGACY_HEAD_KEYS = ("norm_q.bias", "norm_kv.bias", "norm_mlp.bias")


def check_head_layout(keys, source) -> None:
    """Refuse, in one line, discriminator tensors written when the heads were LayerNorm-normed blocks."""
    legacy = sorted(k for k in keys if k.startswith("heads.") and k.endswith(LEGACY_HEAD_KEYS))
    if legacy:
        raise ValueError(f"{source} holds discriminator heads of the earlier layout (LayerNorm pre-norms, no QK "
                         f"RMSNorm; e.g. {legacy[0]}): they cannot be loaded into the Fig. 1 heads. The heads are "
                         "drawn fresh at the start of each APT stage: start the stage again from its inputs")


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the parameter dtype."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class FP32Linear(nn.Linear):
    """Linear computed in fp32 whatever the parameter dtype."""

    def forward(self, x):
        return F.linear(x.float(), self.weight.float(), self.bias.float())


class Discriminator(nn.Module):
    """D(x, t, c) -> logit [B]: the diffusion MMDiT backbone (all layers trainable) plus cross-attention
    heads on the visual tokens after chosen layers; their tokens are concatenated, LayerNorm-ed and
    projected to one scalar. Blocks after the deepest tapped layer never run."""

    def __init__(self, backbone: MMDiT, cfg: DiscriminatorConfig | None = None):
        super().__init__()
        cfg = cfg or DiscriminatorConfig()
        self.backbone = backbone
        bcfg = backbone.config
        self.head_layers = cfg.resolve_layers(bcfg.num_layers)
        d = bcfg.hidden_size
        self.heads = nn.ModuleList(
            [CrossAttentionHead(d, bcfg.num_heads, cfg.head_mlp_ratio, bcfg.norm_eps) for _ in self.head_layers]
        )
        # The logit is formed in fp32: with bf16 weights D(x) - D(x + sigma eps) (aR1, sigma = 0.01) would be
        # rounded to a multiple of ~0.4% of |D(x)|, often exactly 0.
        self.norm = FP32LayerNorm(d * len(self.head_layers), eps=bcfg.norm_eps)
        self.proj = FP32Linear(d * len(self.head_layers), 1)

    @torch.no_grad()
    def init_heads(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Fresh heads (the backbone keeps its diffusion weights)."""
        for name, p in list(self.heads.named_parameters()) + list(self.proj.named_parameters(prefix="proj")):
            if p.ndim >= 2 or name.endswith("query"):
                p.normal_(0.0, std, generator=generator)
            else:
                p.zero_()
        self.norm.weight.fill_(1.0)
        self.norm.bias.zero_()
        for m in (mm for h in self.heads for mm in h.modules() if isinstance(mm, RMSNorm)):
            m.weight.fill_(1.0)

    def logit(self, tokens):
        """The heads' tokens [B, D] each, channel-concatenated, LayerNorm-ed and projected to a logit [B]."""
        return self.proj(self.norm(torch.cat(tokens, dim=-1)))[:, 0]

    def forward(self, x, t, text, text_mask=None, pooled=None):
        feats = self.backbone(x, t, text, text_mask, pooled, features_at=self.head_layers)
        return self.logit([head(f) for head, f in zip(self.heads, feats)])
