"""Real-data metrics of the paper's Appendix A: FID, patch FID (PFID) and CLIP score.

The math is implemented here; the networks are not. Nothing is downloaded: the feature network (for
FID/PFID the standard choice is the 2048-d pool features of the FID Inception-v3) and the CLIP model
must be local files the user provides:

* a feature extractor is either a TorchScript file (``torch.jit.load``) or ``module:function`` /
  ``path/to/file.py:function`` naming a Python factory that takes no arguments and returns a callable
  ``images -> [N, D] features`` (such a factory can build any architecture and load safetensors
  weights from a local path);
* a CLIP model is a local transformers ``CLIPModel`` directory (``config.json``, weights, tokenizer
  and preprocessor files; loaded with ``local_files_only=True``), or a ``module:function`` factory
  returning an object with ``encode_image(images) -> [N, D]`` and ``encode_text(list[str]) -> [N, D]``.

Image conventions: images are ``uint8 [H, W, 3]`` numpy arrays (a list of them, since real images
differ in size). Preprocessing follows Appendix A:

* FID: centre-crop to a square, resize to 299 px (PIL bicubic, which antialiases), features of the
  generated and the ground-truth images;
* PFID: centre-crop a 299 px patch *without* resizing (to measure detail); images smaller than that,
  e.g. 512 px models, are first bilinearly upsampled (``upsample_to=1024`` as in the paper);
* CLIP score: ``100 * max(cos(image, text), 0)`` averaged over the pairs (the convention behind the
  paper's ~33 for good models).

The Fréchet distance is the standard ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` between
Gaussian fits (``scipy.linalg.sqrtm``). It is biased upwards at small sample counts (and the
covariance is singular with fewer samples than feature dimensions): only compare numbers computed
with the same sample counts.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

FID_SIZE = 299

# --------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of ``[N, D]`` features, in float64."""
    if isinstance(features, torch.Tensor):
        f = features.detach().cpu().double().numpy()
    else:
        f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2})``. When the product is
    singular enough that ``sqrtm`` returns non-finite values, ``eps * I`` is added to both covariances.
    A negligible imaginary part from round-off is dropped; a large one is an error.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Singular products (fewer samples than dimensions) are expected here and handled below.
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        scale = max(1.0, float(np.abs(np.trace(sigma1)) + np.abs(np.trace(sigma2))))
        if imag > 1e-3 * scale:
            raise ValueError(f"matrix square root has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def frechet_distance_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


# --------------------------------------------------------------------------------------------------
# Preprocessing (Appendix A)
# --------------------------------------------------------------------------------------------------


def _as_uint8_hwc(img: Any) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W, 3], got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    a = a[..., :3]
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype} (convert with megatron_apt.inference.grid.to_uint8)")
    return a


def center_crop_square(img: np.ndarray) -> np.ndarray:
    """The largest centred square of ``[H, W, C]`` (offsets rounded down, as PIL/torchvision do)."""
    h, w = img.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return img[y0:y0 + s, x0:x0 + s]


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """A centred ``size x size`` patch of ``[H, W, C]``, without resizing; the image must be large enough."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {w}x{h} is smaller than the {size}px patch (upsample it first: upsample_to)")
    y0, x0 = (h - size) // 2, (w - size) // 2
    return img[y0:y0 + size, x0:x0 + size]


def resize(img: np.ndarray, width: int, height: int, resample: str = "bicubic") -> np.ndarray:
    from PIL import Image

    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
    if (img.shape[1], img.shape[0]) == (width, height):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), filters[resample]))


def fid_preprocess(img: Any, size: int = FID_SIZE) -> np.ndarray:
    """FID input: centre-crop to a square, then resize to ``size`` (PIL bicubic). uint8 [size, size, 3]."""
    sq = center_crop_square(_as_uint8_hwc(img))
    return resize(sq, size, size, "bicubic")


def patch_preprocess(img: Any, size: int = FID_SIZE, upsample_to: int | None = None) -> np.ndarray:
    """PFID input: a centred ``size`` patch at native resolution. With ``upsample_to`` the image is first
    bilinearly resized so that its shorter side is ``upsample_to`` (the paper: 512px models -> 1024)."""
    a = _as_uint8_hwc(img)
    if upsample_to:
        h, w = a.shape[:2]
        scale = upsample_to / min(h, w)
        a = resize(a, int(round(w * scale)), int(round(h * scale)), "bilinear")
    return np.ascontiguousarray(center_crop(a, size))


def to_batch(images: Sequence[np.ndarray], input_range: str = "uint8") -> torch.Tensor:
    """Same-size uint8 ``[H, W, 3]`` images -> ``[N, 3, H, W]``: uint8 (``"uint8"``), float in [0, 255]
    (``"float255"``) or float in [0, 1] (``"unit"``)."""
    x = torch.from_numpy(np.stack([_as_uint8_hwc(i) for i in images])).permute(0, 3, 1, 2).contiguous()
    if input_range == "uint8":
        return x
    if input_range == "float255":
        return x.float()
    if input_range == "unit":
        return x.float() / 255.0
    raise ValueError(f"input_range must be uint8, float255 or unit, got {input_range!r}")


# --------------------------------------------------------------------------------------------------
# Loading user-provided networks (never downloads)
# --------------------------------------------------------------------------------------------------


def _load_factory(spec: str) -> Callable[[], Any]:
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"{spec!r} is not 'module:function' or 'file.py:function'")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_megatron_apt_user_{path.stem}", str(path))
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise AttributeError(f"{mod_name} has no attribute {fn_name!r}")
    return fn


def _looks_like_factory(spec: str) -> bool:
    head, sep, tail = spec.rpartition(":")
    return bool(sep and head and tail.isidentifier() and not os.path.exists(spec))


class FeatureExtractor:
    """Wraps a callable ``[N, 3, H, W] -> [N, D]`` with batching, an input convention and call kwargs."""

    def __init__(self, fn: Callable[..., Any], *, input_range: str = "uint8", device: str | torch.device = "cpu",
                 call_kwargs: dict[str, Any] | None = None, batch_size: int = 64, name: str = "features"):
        self.fn = fn
        self.input_range = input_range
        self.device = torch.device(device)
        self.call_kwargs = dict(call_kwargs or {})
        self.batch_size = batch_size
        self.name = name

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = to_batch(images[i:i + self.batch_size], self.input_range).to(self.device)
            f = self.fn(x, **self.call_kwargs)
            if isinstance(f, (tuple, list)):
                f = f[0]
            f = torch.as_tensor(f)
            out.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
        if not out:
            raise ValueError("no images to extract features from")
        return np.concatenate(out)


def load_feature_extractor(spec: str, *, device: str | torch.device = "cpu", input_range: str = "uint8",
                           call_kwargs: dict[str, Any] | str | None = None, batch_size: int = 64) -> FeatureExtractor:
    """A TorchScript file or a ``module:function`` factory (see the module docstring). Nothing is downloaded."""
    if isinstance(call_kwargs, str):
        call_kwargs = json.loads(call_kwargs) if call_kwargs.strip() else {}
    if _looks_like_factory(spec):
        fn = _load_factory(spec)()
        if isinstance(fn, torch.nn.Module):
            fn = fn.to(device).eval()
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"feature network {spec!r} is neither an existing TorchScript file nor a 'module:function' factory; "
                "nothing is downloaded: provide the FID Inception network (or any feature network) locally")
        fn = torch.jit.load(str(path), map_location=str(device)).eval()
    return FeatureExtractor(fn, input_range=input_range, device=device, call_kwargs=call_kwargs,
                            batch_size=batch_size, name=spec)


class TransformersCLIP:
    """A local transformers ``CLIPModel`` directory (e.g. a copy of laion/CLIP-ViT-g-14-laion2B-s12B-b42K)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)

    @torch.no_grad()
    def encode_image(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        inputs = self.processor(images=[_as_uint8_hwc(i) for i in images], return_tensors="pt")
        out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        return getattr(out, "pooler_output", out)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        out = self.model.get_text_features(**{k: v.to(self.device) for k, v in inputs.items()})
        return getattr(out, "pooler_output", out)


def load_clip(spec: str, device: str | torch.device = "cpu") -> Any:
    """A local transformers CLIP directory or a ``module:function`` factory; nothing is downloaded."""
    if _looks_like_factory(spec):
        return _load_factory(spec)()
    path = Path(spec)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise FileNotFoundError(f"CLIP model {spec!r} is neither a local transformers CLIPModel directory (with "
                                "config.json) nor a 'module:function' factory; nothing is downloaded")
    return TransformersCLIP(path, device)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def fid(real: Sequence[np.ndarray], fake: Sequence[np.ndarray], features: Callable[[Sequence[np.ndarray]], np.ndarray],
        size: int = FID_SIZE) -> float:
    """FID: both sets centre-cropped to squares and resized to ``size``, then the FD of their features."""
    fr = features([fid_preprocess(i, size) for i in real])
    ff = features([fid_preprocess(i, size) for i in fake])
    return frechet_distance_from_features(fr, ff)


def patch_fid(real: Sequence[np.ndarray], fake: Sequence[np.ndarray],
              features: Callable[[Sequence[np.ndarray]], np.ndarray], size: int = FID_SIZE,
              upsample_fake_to: int | None = None, upsample_real_to: int | None = None) -> float:
    """PFID: centred ``size`` patches without resizing (optionally after the paper's bilinear upsampling)."""
    fr = features([patch_preprocess(i, size, upsample_real_to) for i in real])
    ff = features([patch_preprocess(i, size, upsample_fake_to) for i in fake])
    return frechet_distance_from_features(fr, ff)


def clip_score_from_embeddings(image_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray) -> float:
    """Mean over pairs of ``100 * max(cos(image_i, text_i), 0)``."""
    a = torch.as_tensor(np.asarray(image_emb) if not isinstance(image_emb, torch.Tensor) else image_emb).double()
    b = torch.as_tensor(np.asarray(text_emb) if not isinstance(text_emb, torch.Tensor) else text_emb).double()
    if a.shape != b.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float((100.0 * cos.clamp(min=0)).mean())


def clip_score(clip: Any, images: Sequence[np.ndarray], texts: Sequence[str], batch_size: int = 32) -> float:
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    ie, te = [], []
    for i in range(0, len(images), batch_size):
        ie.append(torch.as_tensor(clip.encode_image(list(images[i:i + batch_size]))).detach().cpu())
        te.append(torch.as_tensor(clip.encode_text(list(texts[i:i + batch_size]))).detach().cpu())
    return clip_score_from_embeddings(torch.cat(ie), torch.cat(te))


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for x in items:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _pfid_upsample(img: np.ndarray, upsample_to: int | None) -> int | None:
    """The paper's rule: upsample (to 1024 unless told) only images too small for a 299 px patch."""
    if upsample_to:
        return upsample_to
    return 1024 if min(img.shape[:2]) < FID_SIZE else None


def reference_stats(frames: Iterable[np.ndarray], features: Callable[[Sequence[np.ndarray]], np.ndarray],
                    chunk: int = 64) -> dict[str, Any]:
    """Gaussian statistics of real frames for FID and PFID, streamed (only ``chunk`` images in memory)."""
    fid_f, pfid_f = [], []
    for batch in _chunks(frames, chunk):
        fid_f.append(features([fid_preprocess(i) for i in batch]))
        pfid_f.append(features([patch_preprocess(i, FID_SIZE, _pfid_upsample(i, None)) for i in batch]))
    if not fid_f:
        raise ValueError("no real frames for the FID reference")
    fid_all, pfid_all = np.concatenate(fid_f), np.concatenate(pfid_f)
    return {"fid": gaussian_stats(fid_all), "pfid": gaussian_stats(pfid_all), "count": len(fid_all)}


class RealMetrics:
    """Accumulates FID / PFID features and CLIP embeddings of generated frames batch by batch (nothing
    else is kept), then scores them against :func:`reference_stats`."""

    def __init__(self, features: Callable[[Sequence[np.ndarray]], np.ndarray] | None = None, clip: Any = None,
                 patch_upsample_to: int | None = None):
        self.features, self.clip, self.patch_upsample_to = features, clip, patch_upsample_to
        self.fid_f: list[np.ndarray] = []
        self.pfid_f: list[np.ndarray] = []
        self.img_e: list[torch.Tensor] = []
        self.txt_e: list[torch.Tensor] = []

    def add(self, frames: Sequence[np.ndarray], prompts: Sequence[str] | None = None) -> None:
        if self.features is not None:
            self.fid_f.append(self.features([fid_preprocess(i) for i in frames]))
            self.pfid_f.append(self.features([patch_preprocess(i, FID_SIZE, _pfid_upsample(i, self.patch_upsample_to))
                                              for i in frames]))
        if self.clip is not None and prompts is not None:
            if len(prompts) != len(frames):
                raise ValueError(f"{len(frames)} frames but {len(prompts)} prompts")
            self.img_e.append(torch.as_tensor(self.clip.encode_image(list(frames))).detach().float().cpu())
            self.txt_e.append(torch.as_tensor(self.clip.encode_text(list(prompts))).detach().float().cpu())

    def result(self, reference: dict[str, Any] | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.fid_f and reference is not None:
            out["fid"] = frechet_distance(*reference["fid"], *gaussian_stats(np.concatenate(self.fid_f)))
            out["pfid"] = frechet_distance(*reference["pfid"], *gaussian_stats(np.concatenate(self.pfid_f)))
        if self.img_e:
            out["clip_score"] = clip_score_from_embeddings(torch.cat(self.img_e), torch.cat(self.txt_e))
        return out


def iter_media(spec: str | os.PathLike, limit: int | None = None, decode: bool = True
               ) -> Iterator[tuple[np.ndarray | None, str, dict[str, Any]]]:
    """Real images/videos of any sizes, one at a time: a preprocessed pixel data set prefix, or a folder /
    CSV / JSONL as the preprocessor takes them (a folder's ``metadata.jsonl`` is used when present).
    Yields (uint8 ``[T, H, W, 3]`` (T = 1 for images; None without ``decode``), caption ("" where there
    is none), the sample's extra labels (JSONL/CSV extra keys, or the stored sample metadata))."""
    spec = str(spec)
    if os.path.isfile(f"{spec}.json") and not os.path.isdir(spec):  # PREFIX.json: a preprocessed data set
        from megatron_apt.data import indexed

        if not indexed.is_complete(spec):
            raise FileNotFoundError(f"{spec} is not a complete data set")
        from megatron_apt.data.dataset import LatentVideoDataset

        ds = LatentVideoDataset(spec, raw_pixels=True)
        if decode and ds.media != "pixels":
            raise ValueError(f"{spec} stores VAE latents, not pixels: point at the raw images/videos instead")
        for i in range(len(ds) if limit is None else min(limit, len(ds))):
            if decode:
                s = ds[i]
                yield s["pixels"].permute(1, 2, 3, 0).numpy(), s["caption"], s["meta"]
            else:
                meta = ds.meta(i)
                yield None, meta.get("caption", ""), meta
        return
    from megatron_apt.data.media import list_inputs

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"real data {spec!r} is neither a preprocessed data set prefix nor a folder/CSV/JSONL")
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        path = path / "metadata.jsonl"
    items = [it for it in list_inputs(path) if it.error is None and it.kind in ("video", "image")]
    if not items:
        raise ValueError(f"no images or videos found in {spec}")
    for it in items[:limit]:
        media = None
        if decode and it.kind == "video":
            from megatron_apt.inference.video import read_mp4

            media = read_mp4(it.path)
        elif decode:
            from PIL import Image

            with Image.open(it.path) as im:
                media = np.asarray(im.convert("RGB"))[None]
        cap = it.caption
        if cap is None and it.caption_path and Path(it.caption_path).is_file():
            cap = Path(it.caption_path).read_text(encoding="utf-8").strip()
        yield media, cap or "", dict(it.extra)


def load_media(spec: str | os.PathLike, limit: int | None = None
               ) -> tuple[list[np.ndarray], list[str], list[dict[str, Any]]]:
    """All of :func:`iter_media` in memory (small sets: the toy data)."""
    media, captions, extras = [], [], []
    for m, c, e in iter_media(spec, limit):
        media.append(m)
        captions.append(c)
        extras.append(e)
    return media, captions, extras


def iter_frames(spec: str | os.PathLike, limit: int | None = None) -> Iterator[np.ndarray]:
    """Every frame ([H, W, 3] uint8) of the first ``limit`` samples, decoded one sample at a time."""
    for m, _, _ in iter_media(spec, limit):
        yield from m


def frames_as_images(videos: torch.Tensor) -> list[np.ndarray]:
    """``[B, C, T, H, W]`` in [-1, 1] -> a list of ``B * T`` uint8 ``[H, W, 3]`` frames."""
    from megatron_apt.inference.grid import to_uint8

    u = to_uint8(videos)
    return [f for v in u for f in v]

