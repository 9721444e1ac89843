"""The APT generator wrapper and discriminator (paper §3.2-3.3, Eq. 5, Fig. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_apt.config.model import DiscriminatorConfig
from megatron_apt.models.attention import attention_with_lse
from megatron_apt.models.mmdit import MLP, MMDiT


class OneStepGenerator(nn.Module):
    """G(z, c) = z - G_hat(z, c, T) (Eq. 5): the backbone always sees the final timestep T (t = 1)."""

    def __init__(self, backbone: MMDiT):
        super().__init__()
        self.backbone = backbone

    @property
    def config(self):
        return self.backbone.config

    def forward(self, z, text, text_mask=None, pooled=None):
        t = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
        return z - self.backbone(z, t, text, text_mask, pooled)

    @torch.no_grad()
    def sample(self, z, text, text_mask=None, pooled=None, steps: int = 1, timesteps=None):
        """N-step sampling by Euler steps on the backbone's velocity from t = 1 down to 0; steps = 1 is
        exactly forward(). The paper's zero-shot 2-step uses the one-step-trained weights this way."""
        if timesteps is None:
            timesteps = torch.linspace(1.0, 0.0, steps + 1).tolist()
        timesteps = [float(t) for t in timesteps]
        if len(timesteps) < 2 or timesteps[0] != 1.0 or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"timesteps must decrease from 1.0, got {timesteps}")
        x = z
        for t_cur, t_next in zip(timesteps, timesteps[1:]):
            t = torch.full((z.shape[0],), t_cur, device=z.device, dtype=z.dtype)
            x = x + (t_next - t_cur) * self.backbone(x, t, text, text_mask, pooled)
        return x


class HeadAttentionCore(nn.Module):
    """Attention of the head's query token over the visual tokens; returns the output [B, 1, H, Dh].
    Sequence parallel swaps it for a version that combines partial softmaxes across ranks."""

    def forward(self, q, k, v):
        out, _lse = attention_with_lse(q, k, v)
        return out


class CrossAttentionHead(nn.Module):
    """A cross-attention-only transformer block: one learnable query token attends to all visual tokens of
    a backbone layer (pre-norm + residual), then an MLP (pre-norm + residual); yields one token [B, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.core = HeadAttentionCore()

    def forward(self, tokens):
        B = tokens.shape[0]
        q0 = self.query.expand(B, -1, -1).to(tokens.dtype)
        kv = self.norm_kv(tokens)
        q = self.to_q(self.norm_q(q0)).unflatten(-1, (self.num_heads, -1))
        k = self.to_k(kv).unflatten(-1, (self.num_heads, -1))
        v = self.to_v(kv).unflatten(-1, (self.num_heads, -1))
        h = q0 + self.to_out(self.core(q, k, v).flatten(-2))
        h = h + self.mlp(self.norm_mlp(h))
        return h[:, 0]


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
        for m in [self.norm, *[mm for h in self.heads for mm in h.modules() if isinstance(mm, nn.LayerNorm)]]:
            m.weight.fill_(1.0)
            m.bias.zero_()

    def forward(self, x, t, text, text_mask=None, pooled=None):
        feats = self.backbone(x, t, text, text_mask, pooled, features_at=self.head_layers)
        tokens = [head(f) for head, f in zip(self.heads, feats)]
        h = self.norm(torch.cat(tokens, dim=-1))
        return self.proj(h)[:, 0]
