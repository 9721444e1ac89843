"""Tensor-parallel shards of a state dict: split and merged offline (plain concatenation along
megatron-core's partition dim), and gathered live at export (`consolidate_tp`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron_apt.utils import get_logger
from megatron_apt.checkpoint.common import ConversionError

log = get_logger("megatron_apt.checkpoint")

# ---- tensor parallel -----------------------------------------------------------------------------------
_BLOCK_PARAM = re.compile(r"^(?:backbone\.)?blocks\.\d+\.(.+)\.(weight|bias)$")


def tp_partition_dim(name: str) -> int:
    """The dim along which `parallelize_mmdit` splits this tensor across tensor-parallel ranks, -1 if
    replicated (mirrors parallel/tensor_parallel.py: column-parallel weight and bias on dim 0, row-parallel
    weight on dim 1 with its bias replicated, everything else replicated)."""
    from megatron_apt.parallel.tensor_parallel import BLOCK_PLAN

    m = _BLOCK_PARAM.match(name)
    if not m:
        return -1
    kind = dict(BLOCK_PLAN).get(m.group(1))
    if kind == "column":
        return 0
    if kind == "row":
        return 1 if m.group(2) == "weight" else -1
    return -1


def tp_partition_dims(names: Iterable[str]) -> dict[str, int]:
    return {n: tp_partition_dim(n) for n in names}


def check_divisible(state: dict[str, torch.Tensor], dims: dict[str, int], tp: int) -> None:
    for k, v in state.items():
        d = dims.get(k, -1)
        if d >= 0 and v.shape[d] % tp:
            raise ConversionError(f"tensor {k} of shape {tuple(v.shape)} cannot be split {tp} ways along dim {d} "
                                  f"(choose a tensor-parallel size that divides the head count and MLP width)")


def split_tp_shard(state: dict[str, torch.Tensor], tp: int, tp_rank: int,
                   dims: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """This tensor-parallel rank's local tensors of a full state dict (the runtime's `chunk(tp, dim)[rank]`)."""
    if not 0 <= tp_rank < tp:
        raise ConversionError(f"tensor-parallel rank {tp_rank} is outside 0..{tp - 1}")
    dims = dims if dims is not None else tp_partition_dims(state)
    check_divisible(state, dims, tp)
    out = {}
    for k, v in state.items():
        d = dims.get(k, -1)
        out[k] = v.chunk(tp, dim=d)[tp_rank].contiguous() if d >= 0 and tp > 1 else v
    return out


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], dims: dict[str, int], what: str = "shards",
                    check_replicas: bool = True) -> dict[str, torch.Tensor]:
    """Full tensors from per-rank local tensors: concatenation along each tensor's partition dim in rank order."""
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if set(s) != set(keys):
            raise ConversionError(f"{what}: tensor-parallel rank {r} holds other tensors than rank 0 "
                                  f"(differ: {sorted(set(s) ^ set(keys))[:5]})")
    out = {}
    for k in keys:
        d = dims.get(k, -1)
        parts = [s[k] for s in shards]
        if d >= 0:
            ref = list(parts[0].shape)
            for r, p in enumerate(parts):
                other = list(p.shape)
                if len(other) != len(ref) or any(a != b for i, (a, b) in enumerate(zip(other, ref)) if i != d):
                    raise ConversionError(f"{what}: tensor {k} has shape {tuple(p.shape)} on tensor-parallel rank {r} "
                                          f"and {tuple(parts[0].shape)} on rank 0 (mismatched shapes)")
            out[k] = torch.cat(parts, dim=d)
        else:
            if check_replicas:
                for r, p in enumerate(parts[1:], 1):
                    if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                        raise ConversionError(f"{what}: replicated tensor {k} differs between tensor-parallel "
                                              f"ranks 0 and {r}")
            out[k] = parts[0]
    return out


def consolidate_tp(module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All-gather every tensor-parallel parameter of `module` along its partition dim (all TP ranks call)."""
    from megatron_apt.parallel.state import current_dims, tp_group

    if current_dims().tp == 1:
        return state
    g = tp_group()
    n = dist.get_world_size(g)
    params = dict(module.named_parameters())
    out = {}
    for k, v in state.items():
        p = params.get(k)
        if p is not None and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(v) for _ in range(n)]
            dist.all_gather(parts, v.contiguous(), group=g)
            v = torch.cat(parts, dim=p.partition_dim)
        out[k] = v
    return out
