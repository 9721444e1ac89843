"""Model configuration and the size registry (one place for every preset).

`MODEL_PRESETS` holds every named size. `build_mmdit("8b")` and the tools look sizes up here, so a new
size is one entry in this dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class MMDiTConfig:
    """Shape of an SD3-style MMDiT (dual-stream joint-attention diffusion transformer)."""

    in_channels: int = 16
    """Latent channels C of the input x [B, C, T, H, W]."""
    out_channels: int | None = None
    """Channels of the predicted velocity; None means in_channels."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch size (pt, ph, pw) over time, height and width."""
    hidden_size: int = 3072
    """Width D of both streams."""
    num_layers: int = 36
    """Number of joint-attention blocks."""
    num_heads: int = 24
    """Attention heads; head_dim = hidden_size // num_heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of hidden_size (GELU, tanh approximation)."""
    text_dim: int = 4096
    """Width of the text-encoder hidden states (4096 for T5-XXL / UMT5-XXL)."""
    pooled_dim: int = 0
    """Width of an optional pooled text embedding added to the timestep embedding; 0 disables it."""
    qk_norm: bool = True
    """Per-head RMSNorm on queries and keys of both streams."""
    norm_eps: float = 1e-6
    """Epsilon of every LayerNorm / RMSNorm."""
    adaln: str = "shared"
    """'per_block': SD3 adaLN-Zero, one modulation Linear per block and stream (needed to import SD3).
    'shared': one modulation Linear per stream for the whole model plus a learned per-block table
    (adaLN-single style); it keeps a 36-layer, 3072-wide model at ~8 B parameters."""
    pos_embed: str = "rope3d"
    """'rope3d': 3D rotary embedding over (t, h, w) on the visual queries/keys (native resolution and
    aspect ratio, images and videos). 'sincos2d': SD3's fixed 2D sin-cos table, centre-cropped (images)."""
    rope_axes_dim: tuple[int, int, int] | None = None
    """Head-dim split between the t, h and w rotary axes; None gives ~1/4 to t and the rest split evenly."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    pos_embed_max_size: int = 192
    """Side of SD3's sin-cos table (sincos2d only)."""
    pos_embed_base_size: int = 64
    """SD3's 'base_size' (= sample_size // patch) used to scale the sin-cos grid (sincos2d only)."""
    timestep_scale: float = 1000.0
    """t in [0, 1] is multiplied by this before the sinusoidal embedding (diffusers uses 1000 t)."""
    timestep_freq_dim: int = 256
    """Width of the sinusoidal timestep features."""
    last_block_context_pre_only: bool = True
    """The last block only reads the text stream (SD3): its text outputs would never be used."""
    keep_unused_text_query: bool = False
    """SD3 checkpoints hold a text query projection (and its norm) in the last block whose output is never
    used; keep those tensors (unused) so such checkpoints round-trip bit-exactly. Off for native models."""

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if self.rope_axes_dim is not None:
            self.rope_axes_dim = tuple(int(a) for a in self.rope_axes_dim)  # type: ignore[assignment]
        self.validate()

    # ---- derived -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_ch(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @property
    def patch_dim_in(self) -> int:
        pt, ph, pw = self.patch_size
        return self.in_channels * pt * ph * pw

    @property
    def patch_dim_out(self) -> int:
        pt, ph, pw = self.patch_size
        return self.out_ch * pt * ph * pw

    def rope_axes(self) -> tuple[int, int, int]:
        if self.rope_axes_dim is not None:
            return self.rope_axes_dim  # type: ignore[return-value]
        hd = self.head_dim
        t = max(2, (hd // 4) // 2 * 2)
        rest = hd - t
        h = rest // 2 // 2 * 2
        w = rest - h
        return (t, h, w)

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"invalid MMDiTConfig: {msg}")

        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            bad(f"patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            bad(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_layers < 1:
            bad(f"num_layers must be >= 1, got {self.num_layers}")
        if self.adaln not in ("shared", "per_block"):
            bad(f"adaln must be 'shared' or 'per_block', got {self.adaln!r}")
        if self.pos_embed not in ("rope3d", "sincos2d"):
            bad(f"pos_embed must be 'rope3d' or 'sincos2d', got {self.pos_embed!r}")
        if self.pos_embed == "rope3d":
            axes = self.rope_axes()
            if sum(axes) != self.head_dim or any(a % 2 or a <= 0 for a in axes):
                bad(f"rope_axes_dim {axes} must be three positive even numbers summing to head_dim {self.head_dim}")
        if self.pos_embed == "sincos2d" and self.patch_size[0] != 1:
            bad("sincos2d position embedding supports images only (patch_size[0] must be 1)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        if self.rope_axes_dim is not None:
            d["rope_axes_dim"] = list(self.rope_axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MMDiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MMDiTConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class DiscriminatorConfig:
    """The APT discriminator heads (paper §3.3, Fig. 1)."""

    head_layers: tuple[int, ...] | None = None
    """1-based backbone layers whose visual tokens feed a cross-attention head. None places them at the
    paper's fractions 16/36, 26/36 and 36/36 of the depth (16, 26, 36 for 36 layers)."""
    head_fractions: tuple[float, ...] = (16 / 36, 26 / 36, 36 / 36)
    """Depth fractions used when head_layers is None."""
    head_mlp_ratio: float = 4.0
    """MLP width of each cross-attention head block."""

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.head_layers
        if layers is None:
            layers = tuple(max(1, min(num_layers, int(round(f * num_layers)))) for f in self.head_fractions)
        layers = tuple(int(layer) for layer in layers)
        if not layers:
            raise ValueError("discriminator needs at least one head layer")
        for layer in layers:
            if not 1 <= layer <= num_layers:
                raise ValueError(f"discriminator head layer {layer} is outside the backbone's 1..{num_layers} layers")
        if len(set(layers)) != len(layers):
            raise ValueError(
                f"discriminator head layers {layers} contain duplicates (for depth {num_layers}; "
                "set head_layers explicitly)"
            )
        return tuple(sorted(layers))


def _preset(**kw: Any) -> dict[str, Any]:
    return kw


# Every named size. `debug` is for CPU unit tests (well under a second per forward), `toy` is the embedded
# default trained on CPU, `2b` and `8b` are the training sizes (8b: 36 layers, 3072 = 24 x 128 wide, the
# paper's size), `sd3.5-large` is the shape of the public SD3.5-large transformer for imported weights.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "debug": _preset(in_channels=4, hidden_size=32, num_layers=4, num_heads=4, text_dim=24, pooled_dim=0,
                     patch_size=(1, 2, 2)),
    # pixel space (RGB), 4x4 patches: a 2 s, 8-frame 24x24 toy video is 288 tokens, an image 36
    "toy": _preset(in_channels=3, hidden_size=128, num_layers=6, num_heads=4, text_dim=64, pooled_dim=0,
                   patch_size=(1, 4, 4)),
    "2b": _preset(in_channels=16, hidden_size=2048, num_layers=20, num_heads=16, text_dim=4096, pooled_dim=0),
    "8b": _preset(in_channels=16, hidden_size=3072, num_layers=36, num_heads=24, text_dim=4096, pooled_dim=0),
    "sd3.5-large": _preset(in_channels=16, hidden_size=2432, num_layers=38, num_heads=38, text_dim=4096,
                           pooled_dim=2048, patch_size=(1, 2, 2), adaln="per_block", pos_embed="sincos2d",
                           pos_embed_max_size=192, pos_embed_base_size=64, qk_norm=True,
                           keep_unused_text_query=True),
}


def get_model_config(name_or_config: str | MMDiTConfig | dict[str, Any], **overrides: Any) -> MMDiTConfig:
    """Resolve a preset name, a dict or a config into an MMDiTConfig (with optional field overrides)."""
    if isinstance(name_or_config, MMDiTConfig):
        cfg = dataclasses.replace(name_or_config, **overrides) if overrides else name_or_config
        return cfg
    if isinstance(name_or_config, dict):
        return MMDiTConfig.from_dict({**name_or_config, **overrides})
    if isinstance(name_or_config, str):
        if name_or_config not in MODEL_PRESETS:
            raise ValueError(
                f"unknown model preset {name_or_config!r}; known presets: {', '.join(MODEL_PRESETS)}"
            )
        return MMDiTConfig.from_dict({**MODEL_PRESETS[name_or_config], **overrides})
    raise TypeError(f"expected a preset name, dict or MMDiTConfig, got {type(name_or_config).__name__}")
