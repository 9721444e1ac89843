"""Process groups. Built on megatron-core's `parallel_state`; the Ulysses sequence-parallel group is
megatron-core's context-parallel group (its CP attention needs TransformerEngine, its groups do not).

Rank order is megatron-core's: tensor-parallel ranks are adjacent, then sequence (context) parallel, then
data parallel, then pipeline.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_apt.utils import get_logger

log = get_logger("megatron_apt.parallel")


@dataclass(frozen=True)
class ParallelDims:
    """How a job's world is split. world = tp * sp * dp * pp."""

    tp: int = 1
    """Tensor-parallel size (megatron-core Column/RowParallelLinear)."""
    sp: int = 1
    """Sequence-parallel size (Ulysses all-to-all around the attention core)."""
    dp: int = 1
    """Data-parallel size (ZeRO-3 partitions over dp x sp)."""
    pp: int = 1
    """Pipeline-parallel size."""

    @property
    def world_size(self) -> int:
        return self.tp * self.sp * self.dp * self.pp

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, sp: int = 1, pp: int = 1) -> "ParallelDims":
        model = tp * sp * pp
        if tp < 1 or sp < 1 or pp < 1:
            raise ValueError(f"parallel sizes must be >= 1, got tp={tp} sp={sp} pp={pp}")
        if world_size % model:
            raise ValueError(f"world size {world_size} is not divisible by tp*sp*pp = {tp}*{sp}*{pp} = {model}")
        return cls(tp=tp, sp=sp, dp=world_size // model, pp=pp)

    def describe(self) -> str:
        return f"world={self.world_size} (tp={self.tp} x sp={self.sp} x dp={self.dp} x pp={self.pp})"


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun/deepspeed environment variables (single process when
    absent). Returns (rank, world_size)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0") if world == 1 else "0")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def initialize_model_parallel(dims: ParallelDims) -> None:
    """Create the megatron-core groups for `dims` (idempotent for the same dims)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_distributed() first")
    if dist.get_world_size() != dims.world_size:
        raise ValueError(f"parallel layout {dims.describe()} does not match the world size {dist.get_world_size()}")
    if ps.model_parallel_is_initialized():
        cur = current_dims()
        if cur == dims:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.sp,
    )
    log.info("process groups: %s", dims.describe())


def current_dims() -> ParallelDims:
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return ParallelDims()
    return ParallelDims(
        tp=ps.get_tensor_model_parallel_world_size(),
        sp=ps.get_context_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(with_context_parallel=False),
        pp=ps.get_pipeline_model_parallel_world_size(),
    )


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def sp_group():
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group()


def dp_group(with_sp: bool = True):
    """The gradient-averaging group: data parallel x sequence parallel (see `parallel.comm`)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=with_sp)


def replace(dims: ParallelDims, **kw) -> ParallelDims:
    return dataclasses.replace(dims, **kw)
