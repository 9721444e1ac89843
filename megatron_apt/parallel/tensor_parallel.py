"""Tensor parallel with megatron-core's ColumnParallelLinear / RowParallelLinear.

Plan per block (Megatron's attention/MLP split): query, key, value and fc1 of both streams are
column-parallel (heads and MLP width split across ranks), the attention output projections and fc2 are
row-parallel (their outputs all-reduced). Embeddings, adaLN modulation and the output head stay replicated.
The per-head query/key RMSNorm weights are shared by all heads, so each rank sees only its heads' share of
their gradient: `TPRMSNorm` all-reduces that gradient across the tensor-parallel group.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_apt.models.attention import RMSNorm


def _mp_config(tp: int, dtype: torch.dtype, on_cpu: bool):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=False,
        use_cpu_initialization=on_cpu,
        perform_initialization=False,  # weights are copied from the full model (or loaded later)
        params_dtype=dtype,
        gradient_accumulation_fusion=False,
    )


def _noop_init(_w):
    return None


def _mark(param, dim: int) -> None:
    """megatron-core's tensor-parallel attributes (it sets them only when it initialises the weights)."""
    from megatron.core.tensor_parallel.layers import _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS

    for attr in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS:
        if hasattr(param, attr):
            delattr(param, attr)
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def _column_cls():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ColumnParallel(ColumnParallelLinear):
        """megatron-core ColumnParallelLinear returning only the output (bias added)."""

        def forward(self, x):  # noqa: D401
            return super().forward(x)[0]

    return ColumnParallel


def _row_cls():
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowParallel(RowParallelLinear):
        """megatron-core RowParallelLinear (input already split) returning only the output."""

        def forward(self, x):  # noqa: D401
            return super().forward(x)[0]

    return RowParallel


_COLUMN = None
_ROW = None


def _parallel_from(linear: nn.Linear, tp: int, rank: int, dim: int) -> nn.Module:
    """megatron-core's ColumnParallelLinear (dim 0: output features split, bias split) or RowParallelLinear
    (dim 1: input features split, bias whole) holding this rank's chunk of `linear`."""
    global _COLUMN, _ROW
    if dim == 0:
        _COLUMN = _COLUMN or _column_cls()
        cls, kw = _COLUMN, {"gather_output": False}
    else:
        _ROW = _ROW or _row_cls()
        cls, kw = _ROW, {"input_is_parallel": True}
    w = linear.weight
    on_cpu = w.device.type != "cuda"
    mod = cls(linear.in_features, linear.out_features, config=_mp_config(tp, w.dtype, on_cpu),
              init_method=_noop_init, bias=linear.bias is not None, skip_bias_add=False, **kw)
    if w.device.type != "meta":
        mod = mod.to(w.device)
        with torch.no_grad():
            mod.weight.copy_(w.chunk(tp, dim=dim)[rank])
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.chunk(tp, dim=0)[rank] if dim == 0 else linear.bias)
    _mark(mod.weight, dim)
    if dim == 0 and mod.bias is not None:
        _mark(mod.bias, 0)
    return mod


def column_parallel_from(linear: nn.Linear, tp: int, rank: int) -> nn.Module:
    return _parallel_from(linear, tp, rank, 0)


def row_parallel_from(linear: nn.Linear, tp: int, rank: int) -> nn.Module:
    return _parallel_from(linear, tp, rank, 1)


class TPRMSNorm(RMSNorm):
    """RMSNorm whose weight gradient is summed over the tensor-parallel group (heads are split)."""

    def forward(self, x, weight=None):
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        return super().forward(x, copy_to_tensor_model_parallel_region(self.weight))


def tp_rmsnorm_from(norm: RMSNorm) -> TPRMSNorm:
    new = TPRMSNorm(norm.weight.shape[0], norm.eps).to(norm.weight.device, norm.weight.dtype)
    if norm.weight.device.type != "meta":
        with torch.no_grad():
            new.weight.copy_(norm.weight)
    return new


# (module path inside a block, kind)
BLOCK_PLAN: tuple[tuple[str, str], ...] = (
    ("attn.x_q", "column"), ("attn.x_k", "column"), ("attn.x_v", "column"),
    ("attn.c_q", "column"), ("attn.c_k", "column"), ("attn.c_v", "column"),
    ("attn.x_out", "row"), ("attn.c_out", "row"),
    ("x_mlp.fc1", "column"), ("x_mlp.fc2", "row"),
    ("c_mlp.fc1", "column"), ("c_mlp.fc2", "row"),
    ("attn.x_norm_q", "norm"), ("attn.x_norm_k", "norm"), ("attn.c_norm_q", "norm"), ("attn.c_norm_k", "norm"),
)


def _get(mod: nn.Module, path: str):
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _set(mod: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(mod, parent) if parent else mod, name, new)


def apply_tensor_parallel(blocks, tp: int, rank: int) -> int:
    """Swap the planned layers of every block in place; returns how many layers were converted."""
    n = 0
    for block in blocks:
        for path, kind in BLOCK_PLAN:
            old = _get(block, path)
            if old is None:
                continue
            if kind == "column":
                new = column_parallel_from(old, tp, rank)
            elif kind == "row":
                new = row_parallel_from(old, tp, rank)
            else:
                new = tp_rmsnorm_from(old)
            _set(block, path, new)
            n += 1
    return n
