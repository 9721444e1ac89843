"""Data: preprocessing of videos/images into Megatron indexed data sets, the mmap data set, samplers, toy data.

Modules (imported lazily, so that importing ``megatron_apt.data`` stays cheap):
  media       input listing, video decoding with frame-rate resampling, images (no torch)
  indexed     the on-disk format (manifest + one Megatron .bin/.idx pair per field), merge, verify
  preprocess  the preprocessing job behind ``tools/preprocess_video.py``
  dataset     ``LatentVideoDataset`` and ``collate_video_text``
  loader      what the trainer reads: indexed or synthetic samples, the step-indexed sampler, collation
  toy         the moving-digits toy data set behind ``tools/make_toy_dataset.py``
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LatentVideoDataset": "dataset",
    "collate_video_text": "dataset",
    "make_toy_dataset": "toy",
    "ToyConfig": "toy",
    "verify_dataset": "indexed",
    "merge_datasets": "indexed",
    "DatasetError": "indexed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
