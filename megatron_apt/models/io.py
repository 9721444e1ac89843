"""Building models from the size registry, and the project's own checkpoint directory.

A model directory holds `config.json` ({"format": "megatron_apt", "kind": ..., "model": {...}}) and
`model.safetensors`. Only safetensors is read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megatron_apt.config.model import MMDiTConfig, get_model_config
from megatron_apt.models.mmdit import MMDiT
from megatron_apt.utils import atomic_directory

FORMAT = "megatron_apt"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def build_mmdit(name_or_config: str | MMDiTConfig | dict[str, Any], device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int | None = 0, zero_init: bool = True,
                **overrides: Any) -> MMDiT:
    """Build an MMDiT from a preset name ('debug', 'toy', '2b', '8b', 'sd3.5-large'), a dict or a config.

    On device='meta' no memory is allocated (parameter counting, planning). Otherwise weights are
    initialised deterministically from `seed` (adaLN-Zero when zero_init)."""
    cfg = get_model_config(name_or_config, **overrides)
    device = torch.device(device)
    with torch.device(device):
        model = MMDiT(cfg)
    if device.type != "meta":
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(zero_init=zero_init, generator=gen)
    return model.to(dtype=dtype)


def save_mmdit(model: MMDiT, path: str | Path, kind: str = "diffusion", overwrite: bool = False,
               extra: dict[str, Any] | None = None) -> Path:
    """Write a model directory atomically (a killed write leaves nothing that looks complete)."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "kind": kind, "model": model.config.to_dict(), **(extra or {})}
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def save_state_dir(state: dict[str, torch.Tensor], cfg: MMDiTConfig, path: str | Path, kind: str,
                   overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write a full (consolidated) state dict with its model config as a model directory, atomically."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"format": FORMAT, "kind": kind, "model": cfg.to_dict(), **(extra or {})}
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_model_dir(path: str | Path) -> tuple[dict[str, Any], Path]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"model directory {path} is missing {', '.join(missing)}")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT or "model" not in meta:
        raise ValueError(f"{path / CONFIG_NAME} is not a megatron_apt model config (no format/model keys)")
    return meta, path / WEIGHTS_NAME


def load_mmdit(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               expect_kind: str | tuple[str, ...] | None = None) -> MMDiT:
    """Load a model directory written by `save_mmdit` (or the conversion tools)."""
    meta, weights = read_model_dir(path)
    kind = meta.get("kind")
    if expect_kind is not None:
        kinds = (expect_kind,) if isinstance(expect_kind, str) else tuple(expect_kind)
        if kind not in kinds:
            raise ValueError(f"{path} holds a {kind!r} checkpoint, expected one of {kinds}")
    cfg = MMDiTConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = MMDiT(cfg)
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"cannot read {weights}: {e} (truncated or not a safetensors file?)") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{weights}: tensor {k} has shape {tuple(state[k].shape)}, config expects {tuple(v.shape)}")
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype)
