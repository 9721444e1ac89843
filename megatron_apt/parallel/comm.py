"""Differentiable collectives for sequence parallel, each the exact adjoint of its forward.

Gradient convention (the DeepSpeed-Ulysses one): every rank of a sequence-parallel group computes the
plain loss on the replicated outputs; then the gradients of every parameter (and of replicated inputs)
*averaged* over the data-parallel x sequence-parallel group equal the single-rank gradients. With exact
adjoints this holds for any mix of sharded and replicated computation, so no parameter needs a special
rule (the discriminator heads' cross-rank softmax included).

megatron-core's tensor-parallel layers keep their own convention inside each tensor-parallel group
(replicated tensors carry the full gradient on every rank); the two compose because all ranks of a
tensor-parallel group hold the same sequence shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _ws(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


def _all_gather_cat(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_ws(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _Split(torch.autograd.Function):
    """Forward: this rank's chunk along `dim`. Backward (adjoint): the chunk's gradient placed into zeros."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group, ctx.full = dim, group, x.shape[dim]
        return x.chunk(_ws(group), dim=dim)[_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, g):
        r = _rank(ctx.group)
        shape = list(g.shape)
        shape[ctx.dim] = ctx.full
        out = g.new_zeros(shape)
        out.narrow(ctx.dim, r * g.shape[ctx.dim], g.shape[ctx.dim]).copy_(g)
        return out, None, None


class _Gather(torch.autograd.Function):
    """Forward: all-gather along `dim`. Backward (adjoint): sum the gradients over ranks, keep own chunk."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather_cat(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        n, r = _ws(ctx.group), _rank(ctx.group)
        g = g.contiguous()
        if dist.get_backend(ctx.group) == "nccl" and ctx.dim == 0:
            out = torch.empty_like(g.chunk(n, dim=0)[r])
            dist.reduce_scatter_tensor(out, g, group=ctx.group)
            return out, None, None
        dist.all_reduce(g, group=ctx.group)  # gloo has no reduce-scatter; the tensors here are small
        return g.chunk(n, dim=ctx.dim)[r].contiguous(), None, None


class _AllReduce(torch.autograd.Function):
    """Forward: sum over ranks. Backward (adjoint): sum of the gradients over ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _a2a(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    n = _ws(group)
    inp = torch.stack(x.chunk(n, dim=scatter_dim), dim=0).contiguous()  # [n, ...]: chunk i goes to rank i
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp, group=group)  # out[i] came from rank i
    return torch.cat(out.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Forward: scatter `scatter_dim` and gather `gather_dim`. Backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.s, ctx.g, ctx.group = scatter_dim, gather_dim, group
        return _a2a(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, g):
        return _a2a(g, ctx.g, ctx.s, ctx.group), None, None, None


def split(x, dim, group):
    return x if _ws(group) == 1 else _Split.apply(x, dim, group)


def gather(x, dim, group):
    return x if _ws(group) == 1 else _Gather.apply(x, dim, group)


def all_reduce(x, group):
    return x if _ws(group) == 1 else _AllReduce.apply(x, group)


def all_to_all(x, scatter_dim, gather_dim, group):
    return x if _ws(group) == 1 else _AllToAll.apply(x, scatter_dim, gather_dim, group)


def average_gradients(params, group) -> None:
    """Average .grad of `params` over `group` (the DP x SP group) for runs without a DeepSpeed engine."""
    n = _ws(group)
    if n == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(n)


# ---- non-finite steps ------------------------------------------------------------------------------------
def nan_grads_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged when finite; otherwise `loss * NaN`, whose backward makes every gradient it reaches NaN.

    A non-finite loss can still have finite gradients (a NaN term that no parameter feeds); this turns it
    into a non-finite gradient norm, which every engine treats as a step to skip (DeepSpeed through its own
    overflow check), with no host synchronisation here."""
    bad = ~torch.isfinite(loss.detach())
    return loss * torch.where(bad, torch.full_like(loss.detach(), float("nan")), torch.ones_like(loss.detach()))


def all_ranks_true(flag: bool, device: torch.device | str = "cpu", group=None) -> bool:
    """True only if `flag` is true on every rank of `group` (the world by default): a decision every rank takes
    the same way (skip an update, stop a run)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return bool(flag)
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())
