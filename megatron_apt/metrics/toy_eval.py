"""Automatic metrics for the moving-digits toy data set (``megatron_apt/data/toy.py``).

Everything is measured with a small digit reader that the repository trains itself in seconds on CPU,
on frames drawn like the toy data (toy.py's own scikit-learn digit sprites, sizes, gains, backgrounds
and uniformly random positions; 80% of the 1,797 digit images for training, the other 20% for the
held-out accuracy; augmented with contrast, blur, pixel noise and slight tints), plus an 11th "no digit"
class (empty canvases, noise, flat colour plates, smooth blobs) so that failed generations are not
forced onto a digit. It is an MLP that reads a grey window centred on the frame's intensity centre of
mass (so it need not learn every position) together with the whole RGB frame pooled to 8x8 (position,
clutter, colour). It is cached as safetensors under the run folder (``toy_classifier_<hash>.safetensors``;
the hash covers every training setting and the code version).

Metrics of a set of videos ``[N, 3, T, H, W]`` in [-1, 1] against real toy data:

* ``fd``: Fréchet distance of *video* features: the classifier's penultimate (64-d) features of every
  frame, averaged over the frames of a video (one vector per video, so every video weighs the same and
  images are the T = 1 case); ``fd_frames``: the same on per-frame features (N x T vectors: more
  samples, a steadier estimate of the per-frame look, blind to temporal order). ``fd_std`` is the
  bootstrap standard deviation over the generated videos. FD is biased upwards at small N, so only
  numbers with equal N are comparable; the real held-out videos scored the same way give the floor.
* ``text_acc``: the fraction of frames in which the classifier reads the captioned digit (single-digit
  captions only); ``none_rate``: the fraction read as "no digit".
* ``motion_acc``: the fraction of videos whose tracked motion matches the captioned direction. The
  digit is tracked by the intensity centre of mass of each frame (luminance above
  ``median + 0.35 (p98 - median)``: above the background, robust to pixel noise); the displacement is
  the least-squares slope of x and y over the frames times (T - 1); the dominant axis and its sign give
  the direction, and a displacement under ``min_motion_px`` counts as "static" (a mismatch). Images
  (T = 1) skip it.
* ``sharpness``: the mean over frames of the variance of the 3x3 Laplacian of the luminance (in
  [0, 1]); ``hf_energy``: the fraction of spectral energy above half the Nyquist frequency. Both are
  reported next to the real data's value: closer to real is better (noise scores *higher* than real).
* ``saturation``: mean per-pixel standard deviation across R, G, B (the toy data is grey: ~0; the
  colour plates of a collapsed generator score high).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_apt.metrics.real_eval import frechet_distance, gaussian_stats
from megatron_apt.metrics.report import cfg_label

DIRECTIONS = ("left", "right", "up", "down")
NONE_CLASS = 10
NUM_CLASSES = 11
FEATURE_DIM = 64
CLASSIFIER_VERSION = 5

_CAPTION = re.compile(r"^\s*the digit (\d)(?: moving (left|right|up|down))?\s*$")


# --------------------------------------------------------------------------------------------------
# Data: real toy sets and captions
# --------------------------------------------------------------------------------------------------


def parse_caption(caption: str) -> tuple[int | None, str | None]:
    """``"the digit 3 moving left"`` -> ``(3, "left")``; ``"the digit 3"`` -> ``(3, None)``; captions
    with two digits (or anything else) -> ``(None, None)`` (not scored for alignment)."""
    m = _CAPTION.match(caption or "")
    if not m:
        return None, None
    return int(m.group(1)), m.group(2)


@dataclass
class VideoSet:
    """Videos ``[N, 3, T, H, W]`` float in [-1, 1] with their captions (and labels parsed from them)."""

    videos: torch.Tensor
    captions: list[str]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.videos.ndim != 5 or self.videos.shape[1] != 3:
            raise ValueError(f"videos must be [N, 3, T, H, W], got {tuple(self.videos.shape)}")
        if len(self.captions) != self.videos.shape[0]:
            raise ValueError(f"{self.videos.shape[0]} videos but {len(self.captions)} captions")

    def __len__(self) -> int:
        return self.videos.shape[0]

    @property
    def digits(self) -> list[int | None]:
        return [parse_caption(c)[0] for c in self.captions]

    @property
    def directions(self) -> list[str | None]:
        return [parse_caption(c)[1] for c in self.captions]

    @property
    def frames(self) -> int:
        return int(self.videos.shape[2])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.videos.shape[3]), int(self.videos.shape[4])

    def subset(self, idx: Sequence[int]) -> "VideoSet":
        idx = list(idx)
        return VideoSet(self.videos[idx], [self.captions[i] for i in idx], self.source, dict(self.extra))


def _uint8_to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def load_real(spec: str | Path, limit: int | None = None) -> VideoSet:
    """Real toy data: a preprocessed data set prefix (pixel media, e.g. ``data/videos``) or a raw toy
    folder (mp4/png + .txt captions, ``metadata.jsonl`` when present). All samples must share one shape."""
    from megatron_apt.metrics.real_eval import load_media

    spec = str(spec)
    media, captions, extras = load_media(spec, limit)
    extra: dict[str, Any] = {}
    sizes = [s for e in extras for s in (e.get("digit_size") or [])]
    if sizes:
        extra["digit_sizes"] = sizes
    base = Path(spec)
    cfg_file = (base if base.is_dir() else base.parent) / "toy_config.json"
    if base.exists() and cfg_file.is_file():
        c = json.loads(cfg_file.read_text())
        extra["digit_range"] = (int(c["min_digit"]), int(c["max_digit"]))
    return VideoSet(_stack([_uint8_to_video(m) for m in media], spec), captions, spec, extra)


def _stack(vids: list[torch.Tensor], spec: str) -> torch.Tensor:
    shapes = {tuple(v.shape) for v in vids}
    if len(shapes) > 1:
        raise ValueError(f"{spec}: samples differ in shape {sorted(shapes)[:4]}; evaluate one shape at a time")
    return torch.stack(vids)


def digit_range_of(real: VideoSet) -> tuple[int, int]:
    """The digit size range of a real set: from its toy_config.json / labels, else scaled from the canvas
    (8-10 px at 24 px, the toy preset's setting)."""
    if "digit_range" in real.extra:
        return tuple(real.extra["digit_range"])  # type: ignore[return-value]
    if real.extra.get("digit_sizes"):
        s = real.extra["digit_sizes"]
        return int(min(s)), int(max(s))
    size = min(real.size)
    return max(1, round(size * 8 / 24)), max(1, round(size * 10 / 24))


# --------------------------------------------------------------------------------------------------
# Training frames, drawn like toy.render_sample(images=True) but vectorised
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    from megatron_apt.data.toy import _digits

    return _digits()


@functools.lru_cache(maxsize=8)
def _all_sprites(size: int) -> np.ndarray:
    """Every digit image upscaled to ``size`` px with toy.py's own function: [1797, size, size]."""
    from megatron_apt.data.toy import _sprite

    images, _ = _digit_images()
    return np.stack([_sprite(im, size) for im in images])


class FrameRenderer:
    """Draws single toy frames (one digit at a random position) from a subset of the digit images.

    Mirrors ``toy.render_sample`` for images: background U(0, 0.12), sprite = bilinear upscale of the
    8x8 digit to a size in ``[min_digit, max_digit]``, gain U(0.75, 1), composed with ``max``; the
    top-left corner is uniform over the canvas. Sprites are upscaled once with toy.py's own function.
    """

    def __init__(self, size: int, digit_range: tuple[int, int], split: str = "train", seed: int = 0):
        images, targets = _digit_images()
        perm = np.random.default_rng(1234).permutation(len(images))
        cut = int(0.8 * len(images))
        idx = perm[:cut] if split == "train" else perm[cut:]
        self.size = size
        self.sizes = list(range(int(digit_range[0]), int(digit_range[1]) + 1))
        if not self.sizes or self.sizes[0] < 1 or self.sizes[-1] > size:
            raise ValueError(f"digit sizes {digit_range} do not fit a {size}px canvas")
        self.targets = targets[idx]
        self.sprites = {s: _all_sprites(s)[idx] for s in self.sizes}
        self.rng = np.random.default_rng(seed)

    def digits(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` grey frames float32 [n, S, S] in [0, 1] and their digit labels."""
        rng, S = self.rng, self.size
        bg = rng.uniform(0.0, 0.12, n).astype(np.float32)
        canvas = np.repeat(bg[:, None, None], S * S, 1).reshape(n, S, S)
        k = rng.integers(len(self.targets), size=n)
        sz = rng.choice(self.sizes, size=n)
        gain = rng.uniform(0.75, 1.0, n).astype(np.float32)
        for i in range(n):
            s = int(sz[i])
            x, y = (int(v) for v in rng.integers(0, S - s + 1, size=2))
            region = canvas[i, y:y + s, x:x + s]
            np.maximum(region, self.sprites[s][k[i]] * gain[i], out=region)
        return canvas, self.targets[k]

    def nothing(self, n: int) -> np.ndarray:
        """``n`` RGB frames float32 [n, 3, S, S] in [0, 1] holding no digit: empty canvases, noise, flat
        colour plates and smooth blobs."""
        rng, S = self.rng, self.size
        out = np.empty((n, 3, S, S), np.float32)
        kind = rng.integers(4, size=n)
        for i in range(n):
            if kind[i] == 0:  # empty canvas, maybe a little noise
                out[i] = rng.uniform(0, 0.15) + rng.normal(0, rng.uniform(0, 0.05), (1, S, S))
            elif kind[i] == 1:  # noise around some level
                ch = 3 if rng.random() < 0.5 else 1
                out[i] = rng.uniform(0.0, 0.6) + rng.normal(0, rng.uniform(0.1, 0.5), (ch, S, S))
            elif kind[i] == 2:  # flat colour plate
                out[i] = rng.uniform(0, 1, (3, 1, 1)) + rng.normal(0, 0.02, (1, S, S))
            else:  # smooth blobs: coarse noise upsampled
                g = int(rng.integers(2, 5))
                ch = 3 if rng.random() < 0.5 else 1
                coarse = torch.from_numpy(rng.uniform(0, 1, (1, ch, g, g)).astype(np.float32))
                out[i] = F.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=False)[0].numpy()
        return np.clip(out, 0.0, 1.0)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Robustness to what generators produce: contrast, blur, pixel noise, slight colour tints.

    x: grey [B, 1, S, S] or RGB [B, 3, S, S] in [0, 1] -> RGB [B, 3, S, S] in [0, 1]."""
    B = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    x = x * u(0.7, 1.15, B, 1, 1, 1)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    a = u(0, 1, B, 1, 1, 1) * (torch.rand(B, 1, 1, 1, generator=g) < 0.35).float()
    x = (1 - a) * x + a * blur
    sigma = u(0, 0.1, B, 1, 1, 1) * (torch.rand(B, 1, 1, 1, generator=g) < 0.5).float()
    x = x + sigma * torch.randn(x.shape, generator=g)
    tint = (torch.rand(B, 1, 1, 1, generator=g) < 0.5).float()
    x = x * (1 + tint * u(-0.1, 0.1, B, 3, 1, 1)) + tint * u(-0.05, 0.05, B, 3, 1, 1)
    return x.clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------


def centre_of_mass(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intensity centre of mass (x, y) in pixels of frames [N, 3, H, W] in [-1, 1], and its mass [N].

    Weights: the luminance above ``median + 0.35 (p98 - median)`` (the median is the background, the 98th
    percentile the digit's bright strokes): pixel noise and background gradients barely move it. A frame
    without such mass gets the frame centre."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
    lum = ((frames.float().clamp(-1, 1) + 1) / 2 * w).sum(1)
    N, H, W = lum.shape
    flat = lum.flatten(1)
    med = flat.median(dim=1).values.view(N, 1, 1)
    k = min(flat.shape[1], max(1, math.ceil(0.98 * flat.shape[1])))
    top = flat.kthvalue(k, dim=1).values.view(N, 1, 1)
    m = (lum - (med + 0.35 * (top - med))).clamp(min=0)
    mass = m.sum((1, 2))
    ys = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    safe = mass.clamp(min=1e-8)
    com = torch.stack([(m * xs).sum((1, 2)) / safe, (m * ys).sum((1, 2)) / safe], -1)
    com[mass < 1e-6] = torch.tensor([(W - 1) / 2, (H - 1) / 2])
    return com, mass


def centred_crop(frames: torch.Tensor, crop: int) -> torch.Tensor:
    """``crop x crop`` windows [N, C, crop, crop] centred (bilinearly) on each frame's centre of mass;
    outside the frame the background (each channel's median) continues."""
    N, C, H, W = frames.shape
    com, _ = centre_of_mass(frames)
    x = frames.float()
    bg = x.flatten(2).median(dim=2).values.view(N, C, 1, 1)
    off = torch.arange(crop, dtype=torch.float32) - (crop - 1) / 2
    gx = (com[:, 0:1] + off.view(1, -1)) / max(W - 1, 1) * 2 - 1  # [N, crop]
    gy = (com[:, 1:2] + off.view(1, -1)) / max(H - 1, 1) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(N, crop, crop), gy[:, :, None].expand(N, crop, crop)], -1)
    return F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + bg


class DigitClassifier(nn.Module):
    """Frames ``[N, 3, H, W]`` in [-1, 1] -> logits over the digits 0-9 and "no digit" (class 10).

    Input: a grey ``crop``-pixel window centred on the frame's intensity centre of mass (what the digit
    looks like, wherever it is) and the whole RGB frame pooled to 8x8 (where things are, what else is
    there, colour). MLP crop^2 + 192 -> 256 -> 64 (penultimate features, ReLU) -> 11."""

    def __init__(self, crop: int = 14):
        super().__init__()
        self.crop = crop
        self.body = nn.Sequential(nn.Linear(crop * crop + 3 * 64, 256), nn.ReLU(),
                                  nn.Linear(256, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        crop = centred_crop(x, self.crop).mean(1)
        return torch.cat([crop.flatten(1), F.adaptive_avg_pool2d(x, 8).flatten(1)], 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.inputs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def run(self, frames: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, 64], logits [N, 11]) of frames [N, 3, H, W] in [-1, 1], in eval mode."""
        self.eval()
        feats, logits = [], []
        for i in range(0, frames.shape[0], batch_size):
            f = self.features(frames[i:i + batch_size])
            feats.append(f)
            logits.append(self.head(f))
        if not feats:
            return torch.zeros(0, FEATURE_DIM), torch.zeros(0, NUM_CLASSES)
        return torch.cat(feats), torch.cat(logits)


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class ClassifierSettings:
    size: int = 24
    min_digit: int = 8
    max_digit: int = 10
    train_frames: int = 12000
    epochs: int = 15
    batch: int = 256
    lr: float = 4e-3
    seed: int = 0
    heldout: int = 2000

    @property
    def crop(self) -> int:
        return self.max_digit + 4

    def key(self) -> str:
        blob = json.dumps({**self.__dict__, "version": CLASSIFIER_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _grey_to_input(grey: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(grey)
    return t[:, None].expand(-1, 3, -1, -1).contiguous()


def heldout_frames(settings: ClassifierSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean frames from the held-out 20% of the digit images: ([N, 3, S, S] in [-1, 1], labels)."""
    r = FrameRenderer(settings.size, (settings.min_digit, settings.max_digit), "test", seed=settings.seed + 10_000)
    grey, y = r.digits(settings.heldout)
    return _grey_to_input(grey) * 2 - 1, torch.from_numpy(y).long()


def training_set(s: ClassifierSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs (crop + pooled frame, already extracted) and labels of the augmented training frames."""
    renderer = FrameRenderer(s.size, (s.min_digit, s.max_digit), "train", seed=s.seed)
    g = torch.Generator().manual_seed(s.seed)
    n_none = max(1, s.train_frames // NUM_CLASSES)
    grey, y = renderer.digits(s.train_frames - n_none)
    grey = torch.from_numpy(grey)[:, None]
    none = torch.from_numpy(renderer.nothing(n_none))
    y = torch.cat([torch.from_numpy(y).long(), torch.full((n_none,), NONE_CLASS, dtype=torch.long)])
    probe = DigitClassifier(s.crop)
    chunks = [probe.inputs(_augment(grey[i:i + 4096], g) * 2 - 1) for i in range(0, len(grey), 4096)]
    chunks.append(probe.inputs(_augment(none, g) * 2 - 1))
    return torch.cat(chunks), y


def train_classifier(settings: ClassifierSettings | None = None, log=None) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train the digit reader on augmented toy frames (a few seconds on one CPU core)."""
    s = settings or ClassifierSettings()
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    inputs, labels = training_set(s)
    model = DigitClassifier(s.crop)
    steps_per_epoch = math.ceil(len(inputs) / s.batch)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.epochs * steps_per_epoch,
                                                pct_start=0.15)
    g = torch.Generator().manual_seed(s.seed + 1)
    model.train()
    for epoch in range(s.epochs):
        perm = torch.randperm(len(inputs), generator=g)
        total = 0.0
        for i in range(0, len(inputs), s.batch):
            idx = perm[i:i + s.batch]
            loss = F.cross_entropy(model.head(model.body(inputs[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log is not None and ((epoch + 1) % 5 == 0 or epoch + 1 == s.epochs):
            log(f"classifier epoch {epoch + 1}/{s.epochs} loss {total / len(inputs):.3f}")
    model.eval()
    xh, yh = heldout_frames(s)
    _, logits = model.run(xh)
    acc = float((logits.argmax(1) == yh).float().mean())
    return model, {"heldout_acc": acc, "train_seconds": time.perf_counter() - t0, "settings": dict(s.__dict__),
                   "version": CLASSIFIER_VERSION}


def load_or_train_classifier(cache_dir: str | Path | None, settings: ClassifierSettings | None = None,
                             log=None) -> tuple[DigitClassifier, dict[str, Any]]:
    """The cached classifier for these settings (``cache_dir/toy_classifier_<hash>.safetensors``), trained
    and written there first when missing. ``cache_dir=None`` always trains."""
    from safetensors.torch import load_file

    s = settings or ClassifierSettings()
    path = Path(cache_dir) / f"toy_classifier_{s.key()}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                info = json.loads(f.metadata()["info"])
            model = DigitClassifier(s.crop)
            model.load_state_dict(load_file(str(path)))
            model.eval()
            info["cached"] = str(path)
            info["from_cache"] = True
            return model, info
        except Exception as e:  # a truncated or foreign file: retrain and replace it
            if log is not None:
                log(f"ignoring unreadable classifier cache {path}: {e}")
    model, info = train_classifier(s, log)
    if path is not None:
        from safetensors.torch import save

        from megatron_apt.utils import atomic_write

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic_write(path, "wb") as f:
            f.write(save(state, metadata={"info": json.dumps(info), "format": "pt"}))
        info["cached"] = str(path)
    info["from_cache"] = False
    return model, info


# --------------------------------------------------------------------------------------------------
# Individual measures
# --------------------------------------------------------------------------------------------------


def flatten_frames(videos: torch.Tensor) -> torch.Tensor:
    """[N, 3, T, H, W] -> [N * T, 3, H, W] (video-major)."""
    N, C, T, H, W = videos.shape
    return videos.permute(0, 2, 1, 3, 4).reshape(N * T, C, H, W)


def luminance01(videos: torch.Tensor) -> torch.Tensor:
    """[N, 3, T, H, W] in [-1, 1] -> luminance [N, T, H, W] in [0, 1] (Rec. 601 weights)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1, 1)
    return ((videos.float().clamp(-1, 1) + 1) / 2 * w).sum(1)


def track_motion(videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intensity centre of mass per frame ``[N, T, 2]`` (x, y; NaN for a frame with no mass above its
    median), the fitted displacement over the video ``[N, 2]`` (least-squares slope x (T - 1)) and the
    mass per frame ``[N, T]``."""
    N, _, T = videos.shape[:3]
    com, mass = centre_of_mass(flatten_frames(videos))
    com, mass = com.view(N, T, 2).clone(), mass.view(N, T)
    com[mass < 1e-6] = float("nan")
    disp = torch.zeros(N, 2)
    if T > 1:
        t = torch.arange(T, dtype=torch.float32)
        for i in range(N):
            ok = torch.isfinite(com[i, :, 0])
            if ok.sum() < 2:
                continue
            tt = t[ok] - t[ok].mean()
            c = com[i, ok] - com[i, ok].mean(0)
            disp[i] = (tt[:, None] * c).sum(0) / (tt * tt).sum() * (T - 1)
    return com, disp, mass


def direction_of(disp: torch.Tensor, min_motion_px: float = 1.0) -> list[str]:
    """Dominant direction of displacements [N, 2] (x right, y down): left/right/up/down or "static"."""
    out = []
    for dx, dy in disp.tolist():
        if math.hypot(dx, dy) < min_motion_px:
            out.append("static")
        elif abs(dx) >= abs(dy):
            out.append("right" if dx > 0 else "left")
        else:
            out.append("down" if dy > 0 else "up")
    return out


def motion_alignment(videos: torch.Tensor, directions: Sequence[str | None], min_motion_px: float = 1.0
                     ) -> dict[str, Any]:
    """Fraction of the videos with a captioned direction whose tracked motion matches it."""
    if videos.shape[2] < 2:
        return {"motion_acc": None, "motion_n": 0, "motion_px": None}
    _, disp, _ = track_motion(videos)
    pred = direction_of(disp, min_motion_px)
    scored = [i for i, d in enumerate(directions) if d is not None]
    if not scored:
        return {"motion_acc": None, "motion_n": 0, "motion_px": None}
    hits = np.array([pred[i] == directions[i] for i in scored], dtype=np.float64)
    return {"motion_acc": float(hits.mean()), "motion_se": _se(hits), "motion_n": len(scored),
            "motion_px": float(disp[scored].norm(dim=1).mean()),
            "static_rate": float(np.mean([pred[i] == "static" for i in scored])), "_motion_hits": hits}


def _se(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def sharpness(videos: torch.Tensor) -> dict[str, float]:
    """Mean Laplacian variance of the luminance and the high-frequency energy fraction (above half Nyquist)."""
    lum = luminance01(videos)
    N, T, H, W = lum.shape
    x = lum.reshape(N * T, 1, H, W)
    lap = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _LAPLACE)
    lap_var = lap.flatten(1).var(dim=1)
    spec = torch.fft.fft2(x[:, 0] - x[:, 0].mean((1, 2), keepdim=True)).abs().pow(2)
    fy = torch.fft.fftfreq(H).abs().view(H, 1)
    fx = torch.fft.fftfreq(W).abs().view(1, W)
    high = ((fy > 0.25) | (fx > 0.25)).float()
    hf = (spec * high).sum((1, 2)) / spec.sum((1, 2)).clamp(min=1e-12)
    return {"sharpness": float(lap_var.mean()), "hf_energy": float(hf.mean())}


def saturation(videos: torch.Tensor) -> float:
    """Mean per-pixel standard deviation across R, G, B (in [0, 1] units)."""
    return float(((videos.float().clamp(-1, 1) + 1) / 2).std(dim=1, unbiased=False).mean())


def text_alignment(logits: torch.Tensor, digits: Sequence[int | None], frames: int) -> dict[str, Any]:
    """Frame-level accuracy of reading the captioned digit; logits are [N * T, 11] video-major."""
    pred = logits.argmax(1).view(-1, frames)
    scored = [i for i, d in enumerate(digits) if d is not None]
    out: dict[str, Any] = {"none_rate": float((pred == NONE_CLASS).float().mean()) if pred.numel() else None}
    if not scored:
        out.update(text_acc=None, text_n=0)
        return out
    per_video = np.array([(pred[i] == digits[i]).float().mean().item() for i in scored])
    out.update(text_acc=float(per_video.mean()), text_se=_se(per_video), text_n=len(scored),
               _text_per_video=per_video)
    return out


def fd_with_bootstrap(ref: tuple[np.ndarray, np.ndarray], feats: np.ndarray, n_boot: int = 30, seed: int = 0
                      ) -> tuple[float, float]:
    """FD of ``feats`` against the reference Gaussian, and its bootstrap std over resampled ``feats``."""
    fd = frechet_distance(*ref, *gaussian_stats(feats))
    if n_boot <= 1 or len(feats) < 3:
        return fd, float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(feats), len(feats))
        vals.append(frechet_distance(*ref, *gaussian_stats(feats[idx])))
    return fd, float(np.std(vals, ddof=1))


# --------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------


class ToyEvaluator:
    """Scores video sets against a real reference set with the (cached) digit classifier."""

    def __init__(self, reference: VideoSet, cache_dir: str | Path | None = None,
                 settings: ClassifierSettings | None = None, min_motion_px: float = 1.0, n_boot: int = 30,
                 log=None):
        h, w = reference.size
        if h != w:
            raise ValueError(f"toy frames are square, got {w}x{h}")
        if settings is None:
            lo, hi = digit_range_of(reference)
            settings = ClassifierSettings(size=h, min_digit=lo, max_digit=hi)
        self.settings = settings
        self.classifier, self.classifier_info = load_or_train_classifier(cache_dir, settings, log)
        self.min_motion_px = min_motion_px
        self.n_boot = n_boot
        self.reference = reference
        feats = self.frame_features(reference.videos)[0]
        self.ref_video = gaussian_stats(feats.mean(1).numpy())
        self.ref_frames = gaussian_stats(feats.flatten(0, 1).numpy())
        self.ref_sharpness = sharpness(reference.videos)

    def frame_features(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame features [N, T, 64] and logits [N * T, 11]."""
        N, _, T = videos.shape[:3]
        f, logits = self.classifier.run(flatten_frames(videos))
        return f.view(N, T, -1), logits

    def score(self, vs: VideoSet, seed: int = 0) -> dict[str, Any]:
        if vs.size != self.reference.size:
            raise ValueError(f"videos are {vs.size[1]}x{vs.size[0]}, the reference {self.reference.size[1]}x"
                             f"{self.reference.size[0]}")
        feats, logits = self.frame_features(vs.videos)
        out: dict[str, Any] = {"n": len(vs), "frames": vs.frames}
        out["fd"], out["fd_std"] = fd_with_bootstrap(self.ref_video, feats.mean(1).numpy(), self.n_boot, seed)
        out["fd_frames"], out["fd_frames_std"] = fd_with_bootstrap(self.ref_frames, feats.flatten(0, 1).numpy(),
                                                                   self.n_boot, seed)
        out.update(text_alignment(logits, vs.digits, vs.frames))
        out.update(motion_alignment(vs.videos, vs.directions, self.min_motion_px))
        sh = sharpness(vs.videos)
        out.update(sh)
        ref = self.ref_sharpness["sharpness"]
        out["sharpness_ratio"] = sh["sharpness"] / ref if ref else None
        out["saturation"] = saturation(vs.videos)
        return out


def public(metrics: dict[str, Any]) -> dict[str, Any]:
    """Drop the private per-sample arrays (keys starting with '_') for JSON."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------
# Models to compare
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    name: str
    path: str
    steps: int
    cfg: float
    kind: str = ""
    guidance_interval: tuple[float, float] | None = None

    def cfg_label(self) -> str:
        """The guidance as shown in logs: '7.5', or '7.5 in (0, 0.5]' with a guidance interval."""
        return cfg_label(f"{self.cfg:g}", self.guidance_interval)


def _number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_model_spec(text: str) -> ModelSpec:
    """``NAME=DIR[:steps[:cfg[:LO-HI]]]``. Without steps: 1 for generator/consistency models, 25 with CFG 7.5 for
    diffusion models (the paper's baseline). LO-HI limits the guidance to the steps whose t is in (LO, HI]
    (default: every step). The model kind is read from DIR/config.json."""
    from megatron_apt.checkpoint.model_dir import read_model_dir
    from megatron_apt.models.conditioning import parse_guidance_interval

    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--model {text!r}: expected NAME=DIR[:steps[:cfg[:LO-HI]]]")
    interval = None
    head, colon, tail = rest.rpartition(":")
    if colon and head and re.fullmatch(r"[0-9.]+-[0-9.]+", tail):
        interval, rest = parse_guidance_interval(tail), head
    nums: list[str] = []
    while len(nums) < 2:
        head, colon, tail = rest.rpartition(":")
        if colon and head and _number(tail):
            nums.insert(0, tail)
            rest = head
        else:
            break
    if interval is not None and len(nums) < 2:
        raise ValueError(f"--model {text!r}: a guidance interval comes after steps and cfg (DIR:25:7.5:0-0.5)")
    meta, _ = read_model_dir(rest)
    kind = meta.get("kind", "")
    if kind not in ("generator", "consistency", "diffusion"):
        raise ValueError(f"{rest} holds a {kind!r} checkpoint; expected a generator, consistency or diffusion model")
    if len(nums) == 2 and float(nums[0]) != int(float(nums[0])):
        raise ValueError(f"--model {text!r}: steps must be an integer")
    steps = int(float(nums[0])) if nums else (25 if kind == "diffusion" else 1)
    cfg = float(nums[1]) if len(nums) > 1 else (7.5 if kind == "diffusion" and not nums else 1.0)
    if steps < 1:
        raise ValueError(f"--model {text!r}: steps must be >= 1")
    if interval is not None and (kind != "diffusion" or cfg == 1.0):
        raise ValueError(f"--model {text!r}: a guidance interval needs a diffusion model with cfg other than 1")
    return ModelSpec(name, rest, steps, cfg, kind, interval)


def generate_batches(spec: ModelSpec, prompts: Sequence[str], frames: int, height: int, width: int, *,
                     seed: int = 0, batch_size: int = 16, text: str = "bytes", vae: str = "none", device: str = "cpu",
                     dtype: torch.dtype = torch.float32, max_text_len: int = 512, on_batch=None,
                     keep: int | None = None, rank: int = 0, world: int = 1, desc: str | None = None,
                     negative_prompt: str = "") -> tuple[list[tuple[int, torch.Tensor]], float]:
    """This rank's share of the batches of `generate_set`: batches b = rank, rank + world, ... (batch b holds
    prompts [b * batch_size, (b + 1) * batch_size) and uses seed + b, so the samples are those one process
    makes). Returns [(b, videos)] for the batches that hold any of the first `keep` samples (all without
    `keep`; trimmed to them) and the seconds spent generating. ``on_batch(videos, prompts)`` sees every batch
    of this rank, in order."""
    from megatron_apt.inference.pipeline import Generator
    from megatron_apt.utils import progress

    gen = Generator(spec.path, text=text, vae=vae, device=device, dtype=dtype, max_text_len=max_text_len)
    mine = list(range(rank, math.ceil(len(prompts) / batch_size), world))
    out, spent = [], 0.0
    for b in progress(mine, desc=desc or spec.name, unit="batch"):
        i = b * batch_size
        batch = list(prompts[i:i + batch_size])
        t0 = time.perf_counter()
        v = gen.generate(batch, frames=frames, height=height, width=width, seed=seed + b, steps=spec.steps,
                         cfg_scale=spec.cfg, negative_prompt=negative_prompt,
                         guidance_interval=spec.guidance_interval).cpu()
        spent += time.perf_counter() - t0
        if on_batch is not None:
            on_batch(v, batch)
        if keep is None or i < keep:
            out.append((b, v if keep is None else v[:keep - i]))
    return out, spent


def generate_set(spec: ModelSpec, prompts: Sequence[str], frames: int, height: int, width: int, *, seed: int = 0,
                 batch_size: int = 16, text: str = "bytes", vae: str = "none", device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_text_len: int = 512, on_batch=None,
                 keep: int | None = None, negative_prompt: str = "") -> tuple[torch.Tensor, float]:
    """Videos [N, 3, T, H, W] in [-1, 1] for the prompts (batch b uses seed + b, so every model sees the
    same noise) and the seconds spent per sample. ``on_batch(videos, prompts)`` sees every batch;
    ``keep`` limits what is returned (and held in memory) to the first ``keep`` samples."""
    batches, spent = generate_batches(spec, prompts, frames, height, width, seed=seed, batch_size=batch_size,
                                      text=text, vae=vae, device=device, dtype=dtype, max_text_len=max_text_len,
                                      on_batch=on_batch, keep=keep, negative_prompt=negative_prompt)
    return torch.cat([v for _, v in batches]), spent / max(1, len(prompts))
