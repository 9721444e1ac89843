"""Offline checkpoint conversions (no process groups, no DeepSpeed, nothing unpickled).

* `consolidate`: a training checkpoint `RUN/checkpoints/step-N` (DeepSpeed ZeRO-3 flat partitions or plain
  torch tensors, on every tensor-parallel rank) -> consolidated model directories, raw or EMA.
* `reshard` / `load_tp_shard`: a model directory <-> N tensor-parallel shard files.
* `make_apt_init`: the APT starting point: the generator from the consistency-distilled G-hat, the
  discriminator from the original diffusion weights plus fresh cross-attention heads.
* `export_generator`: the one-step generator as an inference checkpoint (kind "generator").

How a training checkpoint is laid out (written by `Trainer.save_checkpoint`): `trainer.json` names the
engines and their model configs; every global rank r wrote `rank{r:05d}.safetensors` and
`rank{r:05d}.json` (its tensor-parallel rank, its ZeRO rank and, per engine, the layout of its tensors).

ZeRO-3 (deepspeed/runtime/zero/partition_parameters.py `_partition_param`, stage3.py
`_create_fp16_partitions_with_defragmentation`): a parameter of n elements is padded to a multiple of the
ZeRO group size Z, partition size pn = ceil(n / Z), and ZeRO rank z holds elements [z*pn, (z+1)*pn) of the
flattened, padded parameter. The flat tensor of a sub-group is the concatenation of that rank's chunks in
the sub-group's parameter order; the fp32 master (`master.i`) and its EMA (`ema.i`) have the same layout.

Tensor parallel: why plain concatenation and not megatron-core `dist_checkpointing`. `dist_checkpointing`
saves and loads its own sharded format through `sharded_state_dict()` with the process groups initialised
(replica ids and the load-time resharding come from `parallel_state`); our training checkpoints are
DeepSpeed flat partitions, not that format, and the conversions here must run on a laptop without
process groups. The split itself is the simplest megatron-core has: `parallel/tensor_parallel.py` builds
every Column/RowParallelLinear weight as `full.chunk(tp, dim)[tp_rank]` with `partition_stride = 1` (no
fused QKV, no interleaved GLU halves), so the full tensor is exactly `torch.cat(shards, partition_dim)` in
tp_rank order, and a shard is the same `chunk` again. Replicated tensors (embeddings, adaLN, norms, the
discriminator heads) are identical on every tensor-parallel rank.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megatron_apt.config.model import DiscriminatorConfig, MMDiTConfig, get_model_config
from megatron_apt.utils import get_logger

log = get_logger("megatron_apt.checkpoint")


TRAINER_META = "trainer.json"
SHARD_NAME = "model-tp{rank}-of-{tp}.safetensors"
GENERATOR_KINDS = ("generator", "consistency")  # a consistency model at t = 1 is a one-step generator (Eq. 5)
DIFFUSION_KINDS = ("diffusion",)
MAX_FORWARD_PARAMS = 2_000_000_000  # --verify runs a CPU forward only below this size
# the trainer builds fresh discriminator heads from torch.Generator().manual_seed(seed + 17) (methods/adversarial.py)
HEAD_SEED_OFFSET = 17
DEFAULT_SEED = 1234  # TrainConfig.seed

Echo = Callable[[str], None]


class ConversionError(ValueError):
    """Bad conversion input or output; the command line reports it on stderr and exits with status 2."""


class VerificationError(RuntimeError):
    """--verify found a difference; nothing was written (verification runs before the output is committed)."""


def quiet(_msg: str) -> None:
    return None


# ---- small readers -------------------------------------------------------------------------------------
def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}): truncated or corrupt?") from e


def safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for truncated / corrupt files
        raise ConversionError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from e


def read_tensors(path: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"weights file {path} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys()) if names is None else list(names)
            have = set(f.keys())
            missing = [k for k in keys if k not in have]
            if missing:
                raise ConversionError(f"{path} has no tensor(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
            return {k: f.get_tensor(k) for k in keys}
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from e


def numel(shape: Iterable[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ConversionError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return table[name]


def dtype_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({str(v.dtype).replace("torch.", "") for v in state.values()})


def check_preset(model_cfg: dict[str, Any], preset: str | None, what: str) -> None:
    """Raise unless the model config equals the named preset's (every field)."""
    if not preset:
        return
    want = get_model_config(preset).to_dict()
    have = MMDiTConfig.from_dict(model_cfg).to_dict()
    diff = [f"{k} {have.get(k)!r} (preset {want[k]!r})" for k in sorted(want) if have.get(k) != want[k]]
    if diff:
        more = " ..." if len(diff) > 6 else ""
        raise ConversionError(f"{what} is not a {preset!r} model: {', '.join(diff[:6])}{more}")


def check_output(output: str | Path, inputs: Iterable[str | Path], overwrite: bool) -> Path:
    """Refuse an output that exists (without overwrite) or that overlaps an input: inputs are never modified."""
    out = Path(output).resolve()
    for i in inputs:
        src = Path(i).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ConversionError(f"output {output} overlaps the input {i}; write it elsewhere "
                                  "(inputs are never modified)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output path {output} already exists (pass --overwrite to replace it)")
    return Path(output)


# ---- model shapes --------------------------------------------------------------------------------------
def head_mlp_ratio_from(shapes: dict[str, Any], hidden: int, prefix: str = "") -> float:
    shp = shapes.get(f"{prefix}heads.0.mlp.fc1.weight")
    return float(shp[0]) / hidden if shp is not None else DiscriminatorConfig().head_mlp_ratio


def build_meta_model(cfg: MMDiTConfig, kind: str, head_layers=None, head_mlp_ratio: float = 4.0):
    """The model of a checkpoint on the meta device (shapes only, no memory)."""
    from megatron_apt.models.discriminator import Discriminator
    from megatron_apt.models.mmdit import MMDiT

    with torch.device("meta"):
        model = MMDiT(cfg)
        if kind == "discriminator":
            model = Discriminator(model, DiscriminatorConfig(head_layers=tuple(head_layers) if head_layers else None,
                                                             head_mlp_ratio=head_mlp_ratio))
    return model


def expected_shapes(cfg: MMDiTConfig, kind: str, head_layers=None, head_mlp_ratio: float = 4.0) -> dict[str, tuple]:
    model = build_meta_model(cfg, kind, head_layers, head_mlp_ratio)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple], what: str) -> None:
    from megatron_apt.models.discriminator import check_head_layout

    try:
        check_head_layout(state, what)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{what} does not match its model config: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ConversionError(f"{what}: tensor {k} has shape {tuple(state[k].shape)}, the model config "
                                  f"expects {tuple(shape)} (mismatched shapes)")


def model_buffers(cfg: MMDiTConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's persistent buffers, recomputed from the config. ZeRO-3 checkpoints hold only the optimiser's
    parameters; the one buffer the MMDiT has is SD3's fixed sin-cos position table."""
    if cfg.pos_embed != "sincos2d":
        return {}
    from megatron_apt.models.mmdit import get_2d_sincos_table

    table = get_2d_sincos_table(cfg.hidden_size, cfg.pos_embed_max_size, cfg.pos_embed_base_size)
    return {f"{prefix}pos_table": table[None].to(torch.float32).contiguous()}


def count_parameters(state: dict[str, torch.Tensor], cfg: MMDiTConfig, kind: str, head_layers=None,
                     head_mlp_ratio: float = 4.0) -> int:
    model = build_meta_model(cfg, kind, head_layers, head_mlp_ratio)
    names = {n for n, _ in model.named_parameters()}
    return sum(v.numel() for k, v in state.items() if k in names)
