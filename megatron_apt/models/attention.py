"""Attention kernels: scaled dot-product attention with a backend choice, rotary embeddings, RMSNorm.

Tensors use the [B, L, H, Dh] layout (tokens before heads) everywhere in the model; the kernels transpose.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

try:  # flash-attn is optional; torch SDPA is the fallback and usually the faster choice on Hopper
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

from megatron_apt.config.train import ATTENTION_BACKENDS

# 'auto' prefers cuDNN SDPA on CUDA (measured ~1.6x the flash backend on H200 at video length), then flash,
# then memory-efficient, then math; on CPU it leaves the choice to PyTorch (its flash CPU kernel, else math).
# The training config (model.attention_backend) and the tools' --attention-backend set it; the environment
# variable MEGATRON_APT_ATTN is the default where neither does.
_BACKEND = os.environ.get("MEGATRON_APT_ATTN", "auto")
_SDPA = ("cudnn", "flash", "efficient", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def backend_unavailable(name: str, device: torch.device | str | None = None) -> str | None:
    """Why `name` cannot run on `device` (None when it can): a tiny attention call under that kernel alone."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "auto":
        return None
    if name == "flash_attn":
        if _flash_attn_func is None:
            return "the flash_attn package is not importable (pip install flash-attn, or the [gpu] extra)"
        if device.type != "cuda":
            return f"flash_attn runs on CUDA devices only, this run uses {device.type}"
        return None
    from torch.nn.attention import sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.zeros(1, 2, 8, 64, device=device, dtype=dtype)
    try:
        with sdpa_kernel([_sdpa_backend(name)]):
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError:
        return f"PyTorch's {name} SDPA kernel is not available on {device.type} here (torch {torch.__version__})"
    return None


def resolve_auto(device: torch.device | str | None = None) -> str:
    """What 'auto' runs on `device`: the first available of cudnn, flash, efficient, math (CUDA); on CPU
    PyTorch's own choice, which is its flash kernel where the inputs allow it, else math."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "flash" if backend_unavailable("flash", device) is None else "math"
    return next(n for n in _SDPA if n == "math" or backend_unavailable(n, device) is None)


def set_attention_backend(name: str, device: torch.device | str | None = None) -> str:
    """Select the attention kernel for this process; returns the kernel it runs on `device` (auto resolved).
    An unknown name, or one this machine cannot run, is a ValueError naming the reason."""
    global _BACKEND
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    why = backend_unavailable(name, device)
    if why is not None:
        raise ValueError(f"attention backend {name!r} is not available: {why}")
    _BACKEND = name
    return resolve_auto(device) if name == "auto" else name


def attention_backend() -> str:
    return _BACKEND


def _sdpa_context(device: torch.device):
    if _BACKEND in ("auto", "flash_attn"):
        if device.type != "cuda":
            return contextlib.nullcontext()  # PyTorch's CPU choice
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel([_sdpa_backend(n) for n in _SDPA], set_priority=True)
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_sdpa_backend(_BACKEND)])


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32 for numerically sensitive math; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, L, H, Dh] tensors; key_mask [B, Lk] bool (True = attend)."""
    if (
        _BACKEND == "flash_attn"
        and key_mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        return _flash_attn_func(q, k, v)
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    with _sdpa_context(q.device):
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
    """Attention that also returns the log-sum-exp of the scores ([B, H, Lq]), for combining partial
    attentions over key shards (the discriminator heads under sequence parallel). Plain PyTorch: the
    query length here is 1, so the scores are tiny."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", upcast(q), upcast(k)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Lq]
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, upcast(v).to(probs.dtype))
    return out.to(q.dtype), lse


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (per-head query/key norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        # the fused kernel computes in fp32 internally for half inputs (bit-identical to the upcast form on
        # the 8b block, and faster)
        return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), self.eps)


def rope_3d(grid: tuple[int, int, int], axes_dim: tuple[int, int, int], theta: float,
            device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [L, head_dim/2] for a (t, h, w) token grid, flattened t-major like the patches."""
    tables = []
    for n, dim in zip(grid, axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
        pos = torch.arange(n, dtype=torch.float64, device=device)
        tables.append(torch.outer(pos, freqs))  # [n, dim/2]
    T, H, W = grid
    ang = torch.cat(
        [
            tables[0][:, None, None, :].expand(T, H, W, -1),
            tables[1][None, :, None, :].expand(T, H, W, -1),
            tables[2][None, None, :, :].expand(T, H, W, -1),
        ],
        dim=-1,
    ).reshape(T * H * W, -1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, Dh] by the angles in cos/sin [L, Dh/2]."""
    xf = upcast(x).unflatten(-1, (-1, 2))
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)
