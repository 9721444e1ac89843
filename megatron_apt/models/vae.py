"""Loading diffusers VAEs from a local directory behind one video interface.

Two kinds are supported, told apart by ``_class_name`` in the directory's ``config.json``:

* ``AutoencoderKLWan`` (Wan 2.1/2.2 video VAE): causal in time, ``1 + 4k`` frames -> ``1 + k``
  latent frames. Latents are normalised per channel with the config's ``latents_mean`` and
  ``latents_std``: ``z_norm = (z - mean) / std``.
* ``AutoencoderKL`` (image VAE, e.g. SD/SDXL/Flux): frames are encoded independently, so the
  temporal compression is 1. Latents are normalised with ``scaling_factor`` and ``shift_factor``:
  ``z_norm = (z - shift) * scale``.

The directory may be the VAE itself or a diffusers pipeline folder with a ``vae/`` subfolder.
Nothing is ever downloaded (``local_files_only``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_CLASSES = ("AutoencoderKLWan", "AutoencoderKL")


@dataclass
class VAEInfo:
    """What a VAE does to shapes, read from its config alone (no weights loaded)."""

    path: str
    class_name: str
    temporal_compression: int
    spatial_compression: int
    latent_channels: int
    config: dict[str, Any] = field(default_factory=dict)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        t = 1 + (frames - 1) // self.temporal_compression if self.temporal_compression > 1 else frames
        return (self.latent_channels, t, height // self.spatial_compression, width // self.spatial_compression)

    def valid_frames(self, frames: int) -> bool:
        r = self.temporal_compression
        return frames >= 1 and (r == 1 or (frames - 1) % r == 0)

    def describe(self) -> dict[str, Any]:
        keep = ("base_dim", "z_dim", "dim_mult", "latent_channels", "block_out_channels", "scaling_factor",
                "shift_factor", "patch_size", "_diffusers_version")
        return {
            "class": self.class_name,
            "path": self.path,
            "temporal_compression": self.temporal_compression,
            "spatial_compression": self.spatial_compression,
            "latent_channels": self.latent_channels,
            "config": {k: self.config[k] for k in keep if k in self.config},
        }


def resolve_vae_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"VAE directory {str(path)!r} does not exist")
    if (p / "config.json").is_file():
        return p
    if (p / "vae" / "config.json").is_file():
        return p / "vae"
    raise FileNotFoundError(f"{str(path)!r} holds no config.json (nor vae/config.json): not a diffusers VAE directory")


def read_vae_info(path: str | os.PathLike) -> VAEInfo:
    d = resolve_vae_dir(path)
    with open(d / "config.json") as f:
        cfg = json.load(f)
    cls = cfg.get("_class_name")
    if cls == "AutoencoderKLWan":
        # Computed from the architecture rather than the pipeline-facing scale_factor_* entries,
        # which keep their defaults when a small test model changes dim_mult.
        patch = int(cfg.get("patch_size") or 1)
        spatial = 2 ** (len(cfg.get("dim_mult", [1, 2, 4, 4])) - 1) * patch
        temporal = 2 ** sum(bool(x) for x in cfg.get("temperal_downsample", [False, True, True]))
        channels = int(cfg.get("z_dim", 16))
    elif cls == "AutoencoderKL":
        spatial = 2 ** (len(cfg.get("block_out_channels", [64])) - 1)
        temporal = 1
        channels = int(cfg.get("latent_channels", 4))
    else:
        raise ValueError(
            f"unsupported VAE class {cls!r} in {d / 'config.json'} (supported: {', '.join(SUPPORTED_CLASSES)})"
        )
    return VAEInfo(str(d), cls, temporal, spatial, channels, cfg)


class VideoVAE:
    """A diffusers VAE seen as a video autoencoder on ``[B, 3, T, H, W]`` tensors in ``[-1, 1]``."""

    def __init__(self, model: torch.nn.Module, info: VAEInfo, device: torch.device, dtype: torch.dtype):
        self.model = model.eval().requires_grad_(False)
        self.info = info
        self.device = torch.device(device)
        self.dtype = dtype
        self.class_name = info.class_name
        self.temporal_compression = info.temporal_compression
        self.spatial_compression = info.spatial_compression
        self.latent_channels = info.latent_channels
        cfg = model.config
        c = self.latent_channels
        if self.class_name == "AutoencoderKLWan":
            mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)
            std = torch.tensor(cfg.latents_std, dtype=torch.float32)
            if mean.numel() != c or std.numel() != c:
                raise ValueError(
                    f"VAE config latents_mean/latents_std have {mean.numel()}/{std.numel()} entries, z_dim is {c}"
                )
            self._shift = mean.view(1, c, 1, 1, 1).to(self.device)
            self._scale = (1.0 / std).view(1, c, 1, 1, 1).to(self.device)
        else:
            self._shift = torch.tensor(float(getattr(cfg, "shift_factor", None) or 0.0), device=self.device)
            self._scale = torch.tensor(float(getattr(cfg, "scaling_factor", None) or 1.0), device=self.device)

    @property
    def name(self) -> str:
        return self.class_name

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return self.info.latent_shape(frames, height, width)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self,
        video: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tile: bool = False,
        frame_chunk: int = 16,
    ) -> torch.Tensor:
        """``video [B, 3, T, H, W]`` in ``[-1, 1]`` -> normalised latents ``[B, C, T', H', W']`` (float32).

        ``sample=False`` takes the posterior mean (deterministic, what preprocessing stores).
        ``frame_chunk`` bounds how many frames an image VAE encodes per forward pass.
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [B, 3, T, H, W], got {tuple(video.shape)}")
        b, _, t, h, w = video.shape
        s = self.spatial_compression
        if h % s or w % s:
            raise ValueError(f"height and width must be multiples of the VAE's spatial compression {s}, got {h}x{w}")
        if not self.info.valid_frames(t):
            raise ValueError(f"{self.class_name} needs 1 + {self.temporal_compression}k frames, got {t}")
        # Contiguous NCTHW: a permuted (channels-last) view makes conv3d many times slower on CPU.
        x = video.to(self.device, self.dtype).contiguous()
        with self._tiling(tile):
            if self.class_name == "AutoencoderKLWan":
                dist = self.model.encode(x).latent_dist
                z = dist.sample(generator) if sample else dist.mode()
            else:
                frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)
                outs = []
                for i in range(0, frames.shape[0], frame_chunk):
                    dist = self.model.encode(frames[i : i + frame_chunk]).latent_dist
                    outs.append(dist.sample(generator) if sample else dist.mode())
                z = torch.cat(outs).reshape(b, t, *outs[0].shape[1:]).permute(0, 2, 1, 3, 4)
        return ((z.float() - self._shift) * self._scale).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: bool = False, frame_chunk: int = 8) -> torch.Tensor:
        """Normalised latents ``[B, C, T', H', W']`` -> video ``[B, 3, T, H, W]`` in ``[-1, 1]`` (float32).

        ``tile=True`` switches on diffusers' built-in spatial tiling for the call, which bounds memory
        at high resolution.
        """
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B, {self.latent_channels}, T, H, W], got {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32) / self._scale + self._shift
        z = z.to(self.dtype)
        with self._tiling(tile):
            if self.class_name == "AutoencoderKLWan":
                video = self.model.decode(z).sample
            else:
                b, c, t, h, w = z.shape
                flat = z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
                outs = [
                    self.model.decode(flat[i : i + frame_chunk]).sample for i in range(0, flat.shape[0], frame_chunk)
                ]
                img = torch.cat(outs)
                video = img.reshape(b, t, *img.shape[1:]).permute(0, 2, 1, 3, 4)
        return video.float().clamp_(-1.0, 1.0)

    # ------------------------------------------------------------------------------------------
    class _TilingScope:
        def __init__(self, model: Any, on: bool):
            self.model, self.on = model, on

        def __enter__(self) -> None:
            if self.on:
                self.model.enable_tiling()

        def __exit__(self, *exc: Any) -> None:
            if self.on:
                self.model.disable_tiling()

    def _tiling(self, on: bool) -> "VideoVAE._TilingScope":
        return VideoVAE._TilingScope(self.model, on)


def speed_up_decoder(model: torch.nn.Module, channels_last: bool = False, compile: bool = False,
                     backend: str = "inductor") -> None:
    """Settings that change how a diffusers VAE's decoder runs, not what it computes (beyond rounding).

    ``channels_last``: the convolution weights in the channels-last layout (``channels_last_3d`` for the
    Conv3d layers, ``channels_last`` for the Conv2d ones; a model-wide ``.to(memory_format=...)`` fails on
    the VAE's 4-D norm scales). cuDNN then runs its channels-last (NDHWC) kernels and the activations
    follow the weights' layout from the first convolution on.
    ``compile``: ``torch.compile`` on the decoder module. The Wan decoder runs once per latent frame with a
    cache of the previous frames' features; the first frame (empty cache), the second (a one-frame cache)
    and the rest are separate graphs, all compiled on the first decode. Static shapes (``dynamic=False``):
    with dynamo's automatic dynamic shapes the second decode recompiles every graph with symbolic sizes.
    ``backend``: torch.compile's (``"eager"`` traces and guards without generating code).
    """
    if channels_last:
        for m in model.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(m, torch.nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    if compile:
        decoder = getattr(model, "decoder", None)
        if decoder is None:
            raise ValueError(f"{type(model).__name__} has no decoder module to compile")
        decoder.compile(dynamic=False, backend=backend)  # in place: the module and its state-dict keys stay as they are


def load_vae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VideoVAE:
    """Load an ``AutoencoderKLWan`` or ``AutoencoderKL`` from a local directory (see module docstring)."""
    info = read_vae_info(path)
    import diffusers

    cls = getattr(diffusers, info.class_name)
    model_dtype = dtype
    if info.class_name == "AutoencoderKL" and dtype == torch.float16 and info.config.get("force_upcast", False):
        model_dtype = torch.float32  # SD/SDXL VAEs overflow in fp16; diffusers' pipelines upcast the same way
    import importlib.util

    # Without accelerate diffusers cannot load lazily and warns; ask for the plain path explicitly then.
    lazy = importlib.util.find_spec("accelerate") is not None
    model = cls.from_pretrained(info.path, torch_dtype=model_dtype, local_files_only=True, low_cpu_mem_usage=lazy)
    model.to(device)
    return VideoVAE(model, info, torch.device(device), model_dtype)
