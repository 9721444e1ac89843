"""Memory-mapped reading of preprocessed data sets (see :mod:`megatron_apt.data.indexed` for the format).

Typical use::

    ds = LatentVideoDataset("data/toy_latents/train")
    sample = ds[0]          # {"latents" or "pixels", "text", "caption", "meta", ...}

The trainer reads it through `megatron_apt.data.loader` (exact global batches, one shape per step).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch

from megatron_apt.data import indexed


class LatentVideoDataset(torch.utils.data.Dataset):
    """A preprocessed data set read through ``numpy.memmap``; one sample per item.

    ``ds[i]`` is a dict with:

    * ``"latents"``: ``[C, T, H, W]`` tensor in the stored dtype (bfloat16 by default), or
      ``"pixels"``: ``[3, T, H, W]`` float32 in ``[-1, 1]`` (``uint8`` with ``raw_pixels=True``);
    * ``"text"``: hidden states ``[L, D]`` (bfloat16), or token ids ``[L]`` (int64) when the data set
      was made without a text encoder (``ds.text_kind`` says which: ``"hidden"`` or ``"ids"``);
    * ``"text_len"`` (int), ``"caption"`` (str), ``"meta"`` (dict: source, clip, start, labels, ...),
      ``"index"`` (int).

    The files are opened lazily in each process (so the object pickles cheaply into DataLoader
    workers) and only the requested sample's bytes are read.
    """

    def __init__(self, prefix: str | os.PathLike, raw_pixels: bool = False):
        self.prefix = str(prefix)
        self.raw_pixels = raw_pixels
        self.manifest = indexed.read_manifest(self.prefix)
        self.fields = self.manifest["fields"]
        self.media = self.manifest["media"]
        self.text_kind = "hidden" if self.fields["text"]["layout"] == "LD" else "ids"
        self._len = int(self.manifest["num_samples"])
        self._open: dict[str, Any] | None = None
        self._pid: int | None = None
        self._shapes: np.ndarray | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def _fields(self) -> dict[str, Any]:
        if self._open is None or self._pid != os.getpid():
            if self._len == 0:
                raise IndexError(f"{self.prefix} holds no samples")
            self._open = {name: indexed.open_field(self.prefix, name) for name in self.fields}
            self._pid = os.getpid()
        return self._open

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        self._open = None

    def __len__(self) -> int:
        return self._len

    # -- whole-data-set arrays (for samplers) ------------------------------------------------
    def _fixed_width(self, name: str, width: int) -> np.ndarray:
        if self._len == 0:
            return np.zeros((0, width), dtype=np.int32)
        ds = self._fields()[name]
        if not np.all(ds.sequence_lengths == width):
            raise indexed.DatasetError(f"{self.prefix}_{name}: expected {width} values per sample")
        return np.array(ds.bin_reader.read(dtype=np.int32, count=width * self._len, offset=0)).reshape(self._len, width)

    def shapes(self) -> np.ndarray:
        """Stored shape of every sample, ``int32 [N, 4]`` (latents: C,T,H,W; pixels: T,H,W,3)."""
        if self._shapes is None:
            self._shapes = self._fixed_width("shapes", 4)
        return self._shapes

    def bucket_keys(self) -> list[tuple[int, int, int]]:
        """``(T, H, W)`` of every sample, the key samplers group micro-batches by."""
        s = self.shapes()
        thw = s[:, 1:4] if self.media == "latents" else s[:, 0:3]
        return [tuple(int(v) for v in row) for row in thw]

    def shape(self, i: int) -> tuple[int, ...]:
        """Shape of sample ``i``'s media tensor as returned by ``ds[i]``: latents [C,T,H,W], pixels [3,T,H,W]."""
        s = self.shapes()[self._check(i)]
        return tuple(int(v) for v in s) if self.media == "latents" else (3, int(s[0]), int(s[1]), int(s[2]))

    def text_lengths(self) -> np.ndarray:
        per = self.fields["textshape"]["per_sample"]
        return self._fixed_width("textshape", per)[:, 0].copy()

    # -- per sample ----------------------------------------------------------------------------
    def meta(self, i: int) -> dict[str, Any]:
        return json.loads(bytes(self._fields()["meta"][self._check(i)]).decode("utf-8"))

    def caption(self, i: int) -> str:
        return self.meta(i)["caption"]

    def _check(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for a data set of {self._len} samples")
        return i

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check(i)
        f = self._fields()
        shape = tuple(int(v) for v in f["shapes"][i])
        mspec = self.fields[self.media]
        media = indexed.from_storage(f[self.media][i], mspec["dtype"]).reshape(shape)
        out: dict[str, Any] = {"index": i}
        if self.media == "latents":
            out["latents"] = media
        else:
            video = media.permute(3, 0, 1, 2).contiguous()  # [T, H, W, 3] -> [3, T, H, W]
            out["pixels"] = video if self.raw_pixels else video.float().div_(127.5).sub_(1.0)
        tshape = tuple(int(v) for v in f["textshape"][i])
        text = indexed.from_storage(f["text"][i], self.fields["text"]["dtype"]).reshape(tshape)
        out["text"] = text if self.text_kind == "hidden" else text.long()
        out["text_len"] = tshape[0]
        meta = json.loads(bytes(f["meta"][i]).decode("utf-8"))
        out["caption"] = meta.get("caption", "")
        out["meta"] = meta
        return out


def collate_video_text(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack one-shape media and pad text to the longest caption of the batch, with a bool mask.

    Returns ``latents``/``pixels`` ``[B, ...]``, ``text`` ``[B, L, D]`` (hidden states) or ``[B, L]``
    (token ids), zeros on padding, ``text_mask`` ``[B, L]`` bool, ``text_len`` ``[B]``, ``index``
    ``[B]``, and the lists ``caption`` and ``meta``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    media_key = "latents" if "latents" in batch[0] else "pixels"
    shapes = {tuple(b[media_key].shape) for b in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"a micro-batch mixes {media_key} shapes {sorted(shapes)}; batch one shape at a time (megatron_apt.data.loader.StepSampler) "
            "(one shape per micro-batch)"
        )
    out: dict[str, Any] = {media_key: torch.stack([b[media_key] for b in batch])}
    text_key = "text"
    lengths = [int(b["text_len"]) for b in batch]
    longest = max(max(lengths), 1)
    first = batch[0][text_key]
    padded = torch.zeros((len(batch), longest, *first.shape[1:]), dtype=first.dtype)
    mask = torch.zeros((len(batch), longest), dtype=torch.bool)
    for j, (b, n) in enumerate(zip(batch, lengths)):
        padded[j, :n] = b[text_key][:n]
        mask[j, :n] = True
    out[text_key] = padded
    out["text_mask"] = mask
    out["text_len"] = torch.tensor(lengths, dtype=torch.long)
    out["index"] = torch.tensor([int(b["index"]) for b in batch], dtype=torch.long)
    out["caption"] = [b["caption"] for b in batch]
    out["meta"] = [b["meta"] for b in batch]
    return out
