"""The project's model directory: one model (or G-hat, generator, discriminator) ready to load.

A model directory holds `config.json` ({"format": "megatron_apt", "kind": ..., "model": {...}}) and
`model.safetensors`. Only safetensors is read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from megatron_apt.config.model import MMDiTConfig
from megatron_apt.models.mmdit import MMDiT
from megatron_apt.utils import atomic_directory, check_free_space
from megatron_apt.checkpoint.common import ConversionError, SHARD_NAME, read_json, read_tensors, build_meta_model, check_state, expected_shapes, head_mlp_ratio_from
from megatron_apt.checkpoint.tensor_parallel import merge_tp_shards, split_tp_shard

if TYPE_CHECKING:
    from megatron_apt.parallel.pipeline import PipelineStage

FORMAT = "megatron_apt"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_mmdit(model: MMDiT, path: str | Path, kind: str = "diffusion", overwrite: bool = False,
               extra: dict[str, Any] | None = None) -> Path:
    """Write a model directory atomically (a killed write leaves nothing that looks complete)."""
    return save_state_dir(model.state_dict(), model.config, path, kind, overwrite=overwrite, extra=extra)


def save_state_dir(state: dict[str, torch.Tensor], cfg: MMDiTConfig, path: str | Path, kind: str,
                   overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write a full (consolidated) state dict with its model config as a model directory, atomically. The free
    space is checked first: a directory that would not fit is refused before anything is written, and the
    directory it would replace stays as it was."""
    path = Path(path)
    check_free_space(path.parent, sum(v.numel() * v.element_size() for v in state.values()),
                     f"the model directory {path.name}")
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


def load_pipeline_stage(kind: str, model_dir, stage: int, num_stages: int, *,
                        layers_per_stage: Iterable[int] | None = None, discriminator_config=None,
                        head_seed: int | None = None, device="cpu") -> PipelineStage:
    """Stage `stage` of a model directory, holding only that stage's tensors in memory: the network is
    built on the meta device, cut, and the stage's tensors are read one by one from the directory's
    safetensors file (so a rank never holds the whole model, which is what pipeline parallel is for).

    kind: "velocity" (the MMDiT), "generator" (OneStepGenerator) or "discriminator" (a Discriminator on the
    directory's weights with fresh heads drawn from `head_seed` exactly as `Discriminator.init_heads` draws
    them for the whole model). Tensor parallel is applied afterwards, to the stage."""
    from safetensors import safe_open

    from megatron_apt.models.discriminator import Discriminator, OneStepGenerator
    from megatron_apt.parallel.pipeline import make_pipeline_stage

    meta, weights = read_model_dir(model_dir)
    cfg = MMDiTConfig.from_dict(meta["model"])
    with torch.device("meta"):
        backbone = MMDiT(cfg)
        model = {"velocity": lambda: backbone, "generator": lambda: OneStepGenerator(backbone),
                 "discriminator": lambda: Discriminator(backbone, discriminator_config)}[kind]()
    if kind == "discriminator":  # the heads are small: draw all of them, as for the whole model, then cut
        for m in (model.heads, model.norm, model.proj):
            m.to_empty(device="cpu")
        model.init_heads(generator=torch.Generator().manual_seed(head_seed if head_seed is not None else 0))
    st = make_pipeline_stage(model, stage, num_stages, layers_per_stage)
    want = st.backbone.state_dict(keep_vars=True)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            have = set(f.keys())
            missing = sorted(set(want) - have)
            if missing:
                raise ValueError(f"{weights} lacks {len(missing)} tensors of pipeline stage {stage} "
                                 f"(e.g. {missing[:3]}); is it a model directory of this config?")
            state = {k: f.get_tensor(k) for k in want}
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"cannot read {weights}: {e} (truncated or not a safetensors file?)") from e
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{weights}: tensor {k} has shape {tuple(state[k].shape)}, config expects {tuple(v.shape)}")
    st.backbone.load_state_dict(state, assign=True, strict=True)
    return st.to(device=device, dtype=torch.float32)


# ---- model directories (consolidated or tensor-parallel sharded) ---------------------------------------
def read_model_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    meta = read_json(path / CONFIG_NAME, "model config")
    if meta.get("format") != FORMAT or "model" not in meta:
        raise ConversionError(f"{path / CONFIG_NAME} is not a megatron_apt model config (no format/model keys)")
    return meta


def check_kind(meta: dict[str, Any], path, kinds: str | tuple[str, ...] | None) -> None:
    if kinds is None:
        return
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if meta.get("kind") not in kinds:
        raise ConversionError(f"{path} holds a {meta.get('kind')!r} checkpoint, expected one of {kinds} "
                              "(kind mismatch)")


def model_dir_files(path: str | Path, meta: dict[str, Any]) -> list[Path]:
    tp = meta.get("tp", 1)
    if not isinstance(tp, int) or isinstance(tp, bool) or not 1 <= tp <= 65536:  # read from a file: checked
        raise ConversionError(f"{Path(path) / CONFIG_NAME}: 'tp' must be a shard count, got {tp!r}")
    if tp > 1:
        return [Path(path) / SHARD_NAME.format(rank=r, tp=tp) for r in range(tp)]
    return [Path(path) / WEIGHTS_NAME]


def meta_model_args(meta: dict[str, Any], shapes: dict[str, Any] | None = None):
    cfg = MMDiTConfig.from_dict(meta["model"])
    kind = meta.get("kind", "diffusion")
    ratio = meta.get("head_mlp_ratio")
    if kind == "discriminator" and ratio is None and shapes is not None:
        ratio = head_mlp_ratio_from(shapes, cfg.hidden_size)
    return cfg, kind, meta.get("head_layers"), float(ratio if ratio is not None else 4.0)


def read_model_state(path: str | Path, expect_kind=None,
                     check: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, full state dict) of a model directory, consolidated (model.safetensors) or tensor-parallel
    sharded (model-tp{r}-of-{N}.safetensors); shapes are checked against the config."""
    path = Path(path)
    meta = read_model_meta(path)
    check_kind(meta, path, expect_kind)
    files = model_dir_files(path, meta)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"model directory {path} is missing {', '.join(missing)} (missing shard)")
    if len(files) == 1:
        state = read_tensors(files[0])
    else:
        dims = meta.get("partition_dims")
        if not isinstance(dims, dict):
            raise ConversionError(f"{path / CONFIG_NAME} says tp={meta['tp']} but has no partition_dims")
        state = merge_tp_shards([read_tensors(f) for f in files], {k: int(v) for k, v in dims.items()}, what=str(path))
    if check:
        cfg, kind, layers, ratio = meta_model_args(meta, {k: v.shape for k, v in state.items()})
        check_state(state, expected_shapes(cfg, kind, layers, ratio), str(path))
    return meta, state


def model_meta(kind: str, cfg: MMDiTConfig | dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    model = cfg.to_dict() if isinstance(cfg, MMDiTConfig) else dict(cfg)
    return {**(extra or {}), "format": FORMAT, "kind": kind, "model": model}


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_model_files(directory: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a consolidated model directory's files into `directory` (inside an atomic_directory block)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    write_json(directory / CONFIG_NAME, meta)


def instantiate(meta: dict[str, Any], state: dict[str, torch.Tensor], device="cpu", dtype=torch.float32):
    cfg, kind, layers, ratio = meta_model_args(meta, {k: v.shape for k, v in state.items()})
    model = build_meta_model(cfg, kind, layers, ratio)
    check_state(state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "state")
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype)


def load_discriminator(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The APT discriminator (`Discriminator`: backbone + heads) of a model directory of kind
    "discriminator" (written by consolidate, make_apt_init or the trainer's export)."""
    meta, state = read_model_state(path, expect_kind="discriminator")
    return instantiate(meta, state, device, dtype)


def load_model(path: str | Path, device="cpu", dtype=torch.float32, expect_kind=None):
    """Any model directory (consolidated or sharded): an MMDiT, or a Discriminator for kind discriminator."""
    meta, state = read_model_state(path, expect_kind=expect_kind)
    return instantiate(meta, state, device, dtype)


def load_tp_shard(path: str | Path, tp_rank: int, tp: int | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of tensor-parallel rank `tp_rank` for a model that `parallelize_mmdit` split `tp` ways
    (default: the directory's own tp). Loads into such a model with `load_state_dict` (strict): the keys
    are the model's own (megatron-core adds its empty `_extra_state` itself). `prefix` is prepended to
    every key (e.g. "backbone." for a OneStepGenerator)."""
    path = Path(path)
    meta = read_model_meta(path)
    have = int(meta.get("tp", 1))
    tp = have if tp is None else int(tp)
    if tp < 1:
        raise ConversionError(f"tp must be >= 1, got {tp}")
    if have > 1 and tp == have:
        if not 0 <= tp_rank < tp:
            raise ConversionError(f"tensor-parallel rank {tp_rank} is outside 0..{tp - 1}")
        f = model_dir_files(path, meta)[tp_rank]
        if not f.is_file():
            raise ConversionError(f"model directory {path} is missing {f.name} (missing shard)")
        local = read_tensors(f)
    else:
        _meta, full = read_model_state(path)
        local = split_tp_shard(full, tp, tp_rank)
    return {prefix + k: v for k, v in local.items()}
