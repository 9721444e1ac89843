"""Joining tensor-parallel shards of a state dict into full tensors (megatron-core's partition_dim)."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
