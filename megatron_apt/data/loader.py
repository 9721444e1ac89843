"""Training data: an indexed dataset (tools/preprocess_video.py) or a synthetic one, a step-indexed sampler
(its position is the step, so resuming needs no sampler state beyond the step), and micro-batch collation."""

from __future__ import annotations

import numpy as np
import torch

from megatron_apt.utils import sample_seed
from megatron_apt.models.text_encoder import TokenEmbedder


class SyntheticData:
    """Deterministic random latents and text (tests, throughput runs)."""

    def __init__(self, shape, text_len: int, text_dim: int, size: int, seed: int, fixed_text_len: bool = False):
        self.shape, self.text_len, self.text_dim, self.size, self.seed = tuple(shape), text_len, text_dim, size, seed
        self.fixed_text_len = fixed_text_len

    def __len__(self):
        return self.size

    def shape_key(self, i: int):
        return self.shape

    def get(self, i: int) -> dict:
        g = torch.Generator().manual_seed(sample_seed(self.seed, 0, "synthetic", i))
        # a low-frequency signal plus a little noise, so that models have something to learn
        base = torch.randn(self.shape[0], 1, 1, 1, generator=g)
        x = base + 0.3 * torch.randn(self.shape, generator=g)
        n = self.text_len if self.fixed_text_len else 1 + int(torch.randint(0, self.text_len, (1,), generator=g))
        text = torch.randn(n, self.text_dim, generator=g)
        return {"x": x, "text": text}


class IndexedData:
    """Samples of an indexed dataset prefix as dict(x [C,T,H,W] float, text [L, D] float).

    `preload(device)` reads every sample once into device memory (pixels stay uint8); `batch(indices)`
    then gathers a micro-batch there, equal to `collate([get(i) for i in indices])`, without per-sample
    reads and copies (what makes a toy model's large batches GPU-bound)."""

    def __init__(self, prefix: str, text_dim: int, max_text_len: int, latent_scale: float = 1.0, seed: int = 0):
        from megatron_apt.data.dataset import LatentVideoDataset

        # several prefixes (comma-separated), e.g. images and videos, form one data set with shape buckets
        self.parts = [LatentVideoDataset(p.strip()) for p in str(prefix).split(",") if p.strip()]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.max_text_len = max_text_len
        self.latent_scale = latent_scale
        self.embed = None
        self.text_dim = text_dim
        self.seed = seed
        self.held = None

    def __len__(self):
        return int(self.offsets[-1])

    def _locate(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k], i - int(self.offsets[k])

    def shape_key(self, i: int):
        ds, j = self._locate(i)
        return tuple(ds.shape(j))

    def get(self, i: int) -> dict:
        ds, j = self._locate(i)
        s = ds[j]
        x = s["latents"] if "latents" in s else s["pixels"]
        x = x.float() * self.latent_scale
        text = s["text"]
        if not torch.is_floating_point(text):  # token ids
            if self.embed is None:
                self.embed = TokenEmbedder(self.text_dim)
            text = self.embed(text)
        text = text.float()[: self.max_text_len]
        if text.shape[-1] != self.text_dim:
            raise ValueError(f"dataset text features have width {text.shape[-1]} but the model's text_dim is "
                             f"{self.text_dim}")
        return {"x": x, "text": text}

    def preload(self, device) -> None:
        """Hold every sample on `device`: media [N, C, T, H, W] per shape (uint8 for pixel data sets) and
        text as padded token ids or features."""
        shapes = [self.shape_key(i) for i in range(len(self))]
        by_shape: dict = {}
        for i, k in enumerate(shapes):
            by_shape.setdefault(k, []).append(i)
        where = np.zeros((len(self), 2), dtype=np.int64)  # (bucket, row)
        media, lengths = [], np.zeros(len(self), dtype=np.int64)
        raw = []
        for b, (key, idx) in enumerate(sorted(by_shape.items(), key=lambda kv: str(kv[0]))):
            rows = []
            for r, i in enumerate(idx):
                ds, j = self._locate(i)
                s = ds[j]
                if "pixels" in s:  # back to the stored uint8: [-1, 1] floats are recomputed exactly in batch()
                    rows.append(s["pixels"].add(1.0).mul(127.5).round().to(torch.uint8))
                else:
                    rows.append(s["latents"])
                t = s["text"][: self.max_text_len]
                raw.append((i, t))
                lengths[i] = t.shape[0]
                where[i] = (b, r)
            media.append(torch.stack(rows).to(device))
        L = int(lengths.max()) if len(lengths) else 1
        first = raw[0][1]
        text = torch.zeros((len(self), L, *first.shape[1:]), dtype=first.dtype)
        for i, t in raw:
            text[i, : t.shape[0]] = t
        self.held = {"media": media, "where": torch.from_numpy(where), "text": text.to(device),
                     "lengths": torch.from_numpy(lengths).to(device), "device": torch.device(device)}
        if not torch.is_floating_point(text) and self.embed is None:
            self.embed = TokenEmbedder(self.text_dim)
        if self.embed is not None:
            self.embed.table = self.embed.table.to(device)

    def batch(self, indices: list[int]) -> dict:
        """A collated micro-batch of preloaded samples (all of one shape), on the preload device."""
        h = self.held
        where = h["where"][indices]
        b = int(where[0, 0])
        if not bool((where[:, 0] == b).all()):
            raise ValueError("a micro-batch mixes sample shapes")
        rows = where[:, 1].to(h["device"])
        m = h["media"][b].index_select(0, rows)
        x = m.float().div_(127.5).sub_(1.0) if m.dtype == torch.uint8 else m.float()
        x = x * self.latent_scale if self.latent_scale != 1.0 else x
        idx = torch.as_tensor(indices, device=h["device"])
        lengths = h["lengths"].index_select(0, idx)
        L = max(int(lengths.max()), 1)
        text = h["text"].index_select(0, idx)[:, :L]
        mask = torch.arange(L, device=h["device"])[None, :] < lengths[:, None]
        if not torch.is_floating_point(text):
            text = self.embed(text)
        text = text.float() * mask[..., None]
        if text.shape[-1] != self.text_dim:
            raise ValueError(f"dataset text features have width {text.shape[-1]} but the model's text_dim is "
                             f"{self.text_dim}")
        return {"x": x, "text": text, "text_mask": mask}


class StepSampler:
    """Global batch of step s = the next N indices of a seeded permutation per epoch. All samples of one
    global batch share one shape (the bucket of its first sample), so every micro-batch has one shape."""

    def __init__(self, data, global_batch: int, seed: int):
        self.data, self.n, self.seed = data, global_batch, seed
        self.size = len(data)
        if self.size == 0:
            raise ValueError("the dataset is empty")
        keys = [data.shape_key(i) for i in range(self.size)] if hasattr(data, "shape_key") else [None] * self.size
        self.buckets: dict = {}
        self._perms: dict = {}
        for i, k in enumerate(keys):
            self.buckets.setdefault(k, []).append(i)

    def _perm(self, epoch: int, bucket: list[int]) -> list[int]:
        key = (epoch, len(bucket), bucket[0])
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            rng = np.random.default_rng(sample_seed(self.seed, epoch, "perm", len(bucket)))
            self._perms[key] = [bucket[j] for j in rng.permutation(len(bucket))]
        return self._perms[key]

    def indices(self, step: int) -> list[int]:
        keys = sorted(self.buckets, key=str)
        key = keys[step % len(keys)]
        bucket = self.buckets[key]
        out = []
        start = (step // len(keys)) * self.n
        while len(out) < self.n:
            epoch, off = divmod(start + len(out), len(bucket))
            perm = self._perm(epoch, bucket)
            out.extend(perm[off: off + self.n - len(out)])
        return out


def collate(samples: list[dict], device) -> dict:
    x = torch.stack([s["x"] for s in samples]).to(device)
    L = max(s["text"].shape[0] for s in samples)
    D = samples[0]["text"].shape[1]
    text = torch.zeros(len(samples), L, D)
    mask = torch.zeros(len(samples), L, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = s["text"].shape[0]
        text[i, :n] = s["text"]
        mask[i, :n] = True
    return {"x": x, "text": text.to(device), "text_mask": mask.to(device)}
