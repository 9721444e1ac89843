"""Text -> one-step (or N-step) generator -> VAE decode -> frames, with per-component timing.

Text conditioning is either a transformers text encoder (a local directory) or token ids (a tokenizer
directory, or bytes) through the fixed `TokenEmbedder` table that training used for id-only datasets.
Without a VAE the model works in pixel space (the embedded default).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_apt.checkpoint.model_dir import load_mmdit, read_model_dir


@dataclass
class Timings:
    text: float = 0.0
    dit: float = 0.0
    vae: float = 0.0
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.text + self.dit + self.vae


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TextConditioner:
    def __init__(self, spec: str, text_dim: int, device, dtype, max_length: int = 512):
        self.max_length = max_length
        self.device, self.dtype = device, dtype
        self.encoder = None
        self.tokenizer = None
        if spec in ("bytes", "none"):
            from megatron_apt.models.text_encoder import ByteTokenizer

            self.tokenizer = ByteTokenizer()
        else:
            p = Path(spec)
            if not p.is_dir():
                raise FileNotFoundError(f"text encoder / tokenizer directory {spec} does not exist "
                                        "(or pass 'bytes' for the byte tokenizer)")
            has_weights = any(p.glob("*.safetensors")) or (p / "config.json").is_file()
            if has_weights and (p / "config.json").is_file():
                from megatron_apt.models.text_encoder import load_text_encoder

                self.encoder = load_text_encoder(str(p), device=device, dtype=dtype)
                if self.encoder.dim != text_dim:
                    raise ValueError(f"text encoder {spec} has width {self.encoder.dim} but the model expects "
                                     f"text_dim={text_dim}")
            else:
                from megatron_apt.models.text_encoder import load_tokenizer

                self.tokenizer = load_tokenizer(str(p))
        if self.encoder is None:
            from megatron_apt.models.text_encoder import TokenEmbedder

            self.embed = TokenEmbedder(text_dim)

    @torch.no_grad()
    def __call__(self, prompts: list[str]):
        if self.encoder is not None:
            h, m = self.encoder.encode(prompts, max_length=self.max_length)
            return h.to(self.device, self.dtype), m.to(self.device)
        ids, mask = self.tokenizer(prompts, max_length=self.max_length)
        return self.embed(ids).to(self.device, self.dtype), mask.to(self.device)


class Generator:
    """Loads a generator (one-step) or diffusion model directory and produces videos in [-1, 1]."""

    def __init__(self, model_dir: str, *, text: str = "bytes", vae: str = "none", device="cpu",
                 dtype=torch.float32, max_text_len: int = 512, parallel_dims=None, compile: bool = False,
                 shift: float | None = None, vae_channels_last: bool = False, vae_compile: bool = False):
        meta, _ = read_model_dir(model_dir)
        self.kind = meta.get("kind")
        # The timestep shift of multi-step diffusion sampling: the user's, else the one the model was trained
        # with (recorded at export; None there = SD3's resolution-dependent sqrt(tokens / 256)), else 1.
        training = meta.get("training") or {}
        self.shift_source = "given" if shift is not None else ("recorded" if "shift" in training else "default")
        self.shift = shift if shift is not None else (training.get("shift", 1.0) if "shift" in training else 1.0)
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"timestep shift must be > 0, got {self.shift}")
        if self.kind not in ("generator", "diffusion", "consistency"):
            raise ValueError(f"{model_dir} holds a {self.kind!r} checkpoint; generation needs a generator, "
                             "consistency or diffusion model (export one with tools/convert_checkpoint.py)")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = load_mmdit(model_dir, device=self.device, dtype=dtype).eval()
        if (parallel_dims is not None and parallel_dims.sp > 1) or compile:
            from megatron_apt.parallel import ParallelDims, parallelize_mmdit

            parallelize_mmdit(self.model, parallel_dims or ParallelDims(), compile=compile)
        cfg = self.model.config
        self.text = TextConditioner(text, cfg.text_dim, self.device, dtype, max_text_len)
        self.vae = None
        if vae != "none":
            from megatron_apt.models.vae import load_vae

            self.vae = load_vae(vae, device=self.device, dtype=dtype)
            if self.vae.latent_channels != cfg.in_channels:
                raise ValueError(f"VAE {vae} has {self.vae.latent_channels} latent channels, the model expects "
                                 f"{cfg.in_channels}")
            from megatron_apt.models.vae import speed_up_decoder

            speed_up_decoder(self.vae.model, channels_last=vae_channels_last, compile=vae_compile)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        cfg = self.model.config
        if self.vae is None:
            shape = (cfg.in_channels, frames, height, width)
        else:
            s = self.vae.spatial_compression
            if height % s or width % s:
                raise ValueError(f"resolution {width}x{height} is not divisible by the VAE's spatial factor {s}")
            shape = tuple(self.vae.latent_shape(frames, height, width))
        _, T, H, W = shape
        pt, ph, pw = cfg.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(f"resolution {width}x{height} with {frames} frames gives a latent {T}x{H}x{W} that is "
                             f"not divisible by the patch {pt}x{ph}x{pw}; choose sizes divisible by "
                             f"{(self.vae.spatial_compression if self.vae else 1) * ph}")
        return shape

    def memory_estimate(self, frames: int, height: int, width: int, batch: int, samples: int,
                        text_len: int = 512) -> dict[str, int]:
        """Bytes that a run surely needs beyond the loaded weights (a lower bound, so a refusal is certain to
        be right): on the model's device, one batch's latents, the widest live activations of a block (the
        residual stream, the q/k/v projections and the MLP's hidden layer over every token; attention
        kernels add more, depending on the backend) and its decoded frames; on the host, every sample's
        decoded frames, kept for the grid."""
        cfg = self.model.config
        C, T, H, W = self.latent_shape(frames, height, width)
        pt, ph, pw = cfg.patch_size
        tokens = (T // pt) * (H // ph) * (W // pw) + text_len
        el = torch.finfo(self.dtype).bits // 8
        latents = batch * C * T * H * W * el
        acts = batch * tokens * cfg.hidden_size * el * int(4 + cfg.mlp_ratio)
        pixels = 3 * frames * height * width * 4  # float32 frames in [-1, 1]
        return {"device": latents * 2 + acts + batch * pixels, "host": samples * pixels}

    def check_memory(self, frames: int, height: int, width: int, batch: int, samples: int) -> None:
        """Refuse, before allocating anything, a size whose memory_estimate exceeds the free memory."""
        need = self.memory_estimate(frames, height, width, batch, samples)
        import psutil

        free_host = psutil.virtual_memory().available
        free_dev = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        checks = [("host memory", need["host"] + (need["device"] if free_dev is None else 0), free_host)]
        if free_dev is not None:
            checks.append((f"{self.device} memory", need["device"], free_dev))
        for where, n, free in checks:
            if n > free:
                raise MemoryError(f"{width}x{height} with {frames} frames needs at least {n / 2**30:.1f} GiB of "
                                  f"{where} (batch {batch}, {samples} samples), only {free / 2**30:.1f} GiB is free; "
                                  "lower the resolution, --frames or --batch-size")

    @torch.no_grad()
    def velocity(self, x, t, text, mask):
        tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        return self.model(x, tt, text, mask)

    def shift_for(self, latent_shape) -> float:
        """The sampling shift for latents [B, C, T, H, W] (resolution dependent when recorded as None)."""
        if self.shift is not None:
            return float(self.shift)
        pt, ph, pw = self.model.config.patch_size
        _, _, T, H, W = latent_shape
        return max(1.0, math.sqrt((T // pt) * (H // ph) * (W // pw) / 256.0))

    def timesteps(self, steps: int, latent_shape) -> list[float]:
        """t_0 = 1 > t_1 > ... > t_steps = 0: uniform, shifted for diffusion models (Eq. 7's shift, as in
        flow-matching training) so that the sampler spends its steps where the model was trained to."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        if self.kind == "diffusion" and steps > 1:
            s = self.shift_for(latent_shape)
            t = s * t / (1 + (s - 1) * t)
        return t.tolist()

    @torch.no_grad()
    def sample_latents(self, z, text, mask, steps: int = 1, cfg_scale: float = 1.0, timesteps=None,
                       negative=None, generator: torch.Generator | None = None, guidance_interval=None):
        """Diffusion models: Euler steps from t = 1 to 0, with classifier-free guidance (cfg_scale > 1)
        against `negative` (an encoded negative prompt: features [1, L, D], mask [1, L]) or the null text, at
        the steps whose t lies in `guidance_interval` (lo, hi] (None: every step, the paper's constant CFG).
        Generator and consistency models: x0 prediction and re-noising at each step (1 step = the one-step
        generator; `timesteps` [1, t, 0] sets the two-step's intermediate t)."""
        from megatron_apt.inference.sampling import euler, renoise
        from megatron_apt.models.conditioning import FULL_INTERVAL, cfg_text_batch, check_guidance_interval

        ts = timesteps if timesteps is not None else self.timesteps(steps, z.shape)
        if self.kind in ("generator", "consistency"):
            if cfg_scale != 1.0 or guidance_interval is not None:
                raise ValueError(f"a {self.kind} model samples without classifier-free guidance (cfg 1)")
            return renoise(lambda x, t: self.velocity(x, t, text, mask), z, ts, generator)
        if cfg_scale != 1.0:
            text2, mask2 = cfg_text_batch(text, mask, negative)
            n = text.shape[0]
            return euler(lambda x, t: self.velocity(x, t, text2[:n], mask2[:n]), z, ts, cfg_scale,
                         lambda x, t: self.velocity(x, t, text2[n:], mask2[n:]),
                         check_guidance_interval(guidance_interval or FULL_INTERVAL))
        return euler(lambda x, t: self.velocity(x, t, text, mask), z, ts)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, frames: int, height: int, width: int, seed: int = 0, steps: int = 1,
                 cfg_scale: float = 1.0, tile_vae: bool = False, timings: Timings | None = None,
                 negative_prompt: str = "", timesteps=None, guidance_interval=None):
        t0 = time.perf_counter()
        text, mask = self.text(prompts)
        negative = self.text([negative_prompt]) if negative_prompt and cfg_scale != 1.0 else None
        _sync(self.device)
        t1 = time.perf_counter()
        shape = self.latent_shape(frames, height, width)
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((len(prompts), *shape), generator=g).to(self.device, self.dtype)
        lat = self.sample_latents(z, text, mask, steps=steps, cfg_scale=cfg_scale, timesteps=timesteps,
                                  negative=negative, generator=g, guidance_interval=guidance_interval)
        _sync(self.device)
        t2 = time.perf_counter()
        video = self.vae.decode(lat, tile=tile_vae) if self.vae is not None else lat
        video = video.float().clamp(-1, 1)
        _sync(self.device)
        t3 = time.perf_counter()
        if timings is not None:
            timings.text += t1 - t0
            timings.dit += t2 - t1
            timings.vae += t3 - t2
        return video
