"""The one place where parallelism is applied to a model (the model files hold none)."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megatron_apt.parallel.state import ParallelDims, current_dims
from megatron_apt.utils import get_logger

log = get_logger("megatron_apt.parallel")


def _checkpointed_forward(orig, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(orig, *args, use_reentrant=False, **kwargs)
    return orig(*args, **kwargs)


# The attention kernels of scaled_dot_product_attention, one per backend (CPU, cuDNN, flash, memory-efficient).
_ATTENTION_OP_NAMES = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
                       "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention")


@functools.cache
def _attention_ops() -> frozenset:
    return frozenset(getattr(torch.ops.aten, n).default for n in _ATTENTION_OP_NAMES if hasattr(torch.ops.aten, n))


def _keep_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing policy of scope 'attention': the attention kernel's outputs (its output and
    log-sum-exp) are kept; every other op of the block is recomputed in the backward pass."""
    return CheckpointPolicy.MUST_SAVE if op in _attention_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed_forward_keep_attention(orig, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(orig, *args, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_attention),
                          **kwargs)
    return orig(*args, **kwargs)


def apply_activation_checkpointing(blocks, keep_attention: bool = False) -> int:
    """Recompute each block in the backward pass (keeps parameter names unchanged); with keep_attention, all
    of it but the attention kernel, whose outputs are kept (torch's selective activation checkpointing)."""
    wrap = _checkpointed_forward_keep_attention if keep_attention else _checkpointed_forward
    n = 0
    for block in blocks:
        if getattr(block, "_apt_checkpointed", False):
            continue
        block.forward = functools.partial(wrap, block.forward)
        block._apt_checkpointed = True
        n += 1
    return n


# How many compiled variants one block's forward may keep. An APT step runs the same block code (one code
# object shared by every block of G and D) in several legitimate configurations, each compiled once: with and
# without grad (G forward-only in D's update), D trainable and frozen (its parameters' requires_grad is
# switched off for G's update), real inputs and inputs that need a gradient (D on G's samples), the fused
# [real, perturbed, fake] batch and the plain one, and the last block (context-pre-only, a different
# modulation width). That is more than dynamo's default of 8, after which it silently runs the block in
# eager mode for the rest of the run; 64 bounds the same runaway it guards against.
COMPILE_RECOMPILE_LIMIT = 64


def compile_block(block: nn.Module, backend: str = "inductor") -> None:
    """torch.compile one block's forward, with room for the variants an APT step needs
    (COMPILE_RECOMPILE_LIMIT). The forward, not the module's call: a call runs the module's hooks too, and
    DeepSpeed ZeRO-3 hangs its parameter gathering and release on hooks of every block that is a leaf module
    (the generator's, parallel.zero3_leaf_blocks). Traced into the compiled code, those hooks broke the graph
    and failed its guards on every switch of grad mode, recompiling past a hundred times in a run; now they
    stay eager around the compiled forward. The discriminator's blocks are no leaves: ZeRO-3's hooks sit on
    their sub-modules, inside the forward, and break its graph there (a fixed set of graphs, compiled in the
    first step)."""
    import inspect

    if getattr(block, "_apt_compiled", False):
        return
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # per function (recent torch)
        block.forward = torch.compile(block.forward, backend=backend, recompile_limit=COMPILE_RECOMPILE_LIMIT)
    else:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
        block.forward = torch.compile(block.forward, backend=backend)
    block._apt_compiled = True


def check_heads(num_heads: int, dims: ParallelDims) -> None:
    if num_heads % (dims.tp * dims.sp):
        raise ValueError(
            f"{num_heads} attention heads are not divisible by tp x sp = {dims.tp} x {dims.sp}; "
            "choose tensor- and sequence-parallel sizes whose product divides the head count"
        )


def parallelize_mmdit(model: nn.Module, dims: ParallelDims | None = None, *,
                      activation_checkpointing: bool | str = False, compile: bool | str = False,
                      extra_blocks=()) -> nn.Module:
    """Apply tensor parallel, Ulysses sequence parallel, activation checkpointing and torch.compile.

    `dims` defaults to the layout of the initialised process groups. Works for the MMDiT and for anything
    that holds one as `.backbone` (the APT discriminator, the generator); `extra_blocks` are further
    modules to checkpoint whole. `activation_checkpointing`: False, True or 'block' (recompute every block),
    'mlp' (selective: recompute only the blocks' MLPs, keep the rest), 'attention' (selective: recompute the
    blocks but their attention kernels, whose outputs are kept). The model is changed in
    place and returned. `compile`: True compiles each block's forward with inductor; a string names another
    torch.compile backend (tests use 'eager', which keeps dynamo's guards and recompiles without code generation).
    """
    from megatron_apt.config.train import checkpointing
    from megatron_apt.models.mmdit import MMDiT

    dims = dims or current_dims()
    backbone = model if isinstance(model, MMDiT) else getattr(model, "backbone", None)
    if not isinstance(backbone, MMDiT):
        raise TypeError(f"parallelize_mmdit needs an MMDiT or a module with an MMDiT .backbone, got {type(model).__name__}")
    cfg = backbone.config
    check_heads(cfg.num_heads, dims)
    # a pipeline stage keeps its blocks (and D's heads) in ModuleDicts keyed by index
    blocks = list(backbone.blocks.values()) if isinstance(backbone.blocks, nn.ModuleDict) else list(backbone.blocks)
    applied = []
    if dims.tp > 1:
        from megatron_apt.parallel.state import tp_group
        from megatron_apt.parallel.tensor_parallel import apply_tensor_parallel

        n = apply_tensor_parallel(blocks, dims.tp, dist.get_rank(tp_group()))
        applied.append(f"tensor parallel {dims.tp} ({n} layers -> megatron-core Column/RowParallelLinear)")
    if dims.sp > 1:
        from megatron_apt.parallel.sequence_parallel import (
            SPHeadAttentionCore,
            SPSequenceGather,
            SPSequenceShard,
            UlyssesAttentionCore,
        )
        from megatron_apt.parallel.state import sp_group

        g = sp_group()
        backbone.seq_shard = SPSequenceShard(g)
        backbone.seq_gather = SPSequenceGather(g)
        for block in blocks:
            block.attn.core = UlyssesAttentionCore(g)
        heads = getattr(model, "heads", None) or []  # the discriminator's cross-attention heads
        heads = list(heads.values()) if isinstance(heads, nn.ModuleDict) else list(heads)
        for head in heads:
            head.core = SPHeadAttentionCore(g)
        applied.append(f"sequence parallel {dims.sp} (Ulysses all-to-all, {len(backbone.blocks)} attention cores"
                       + (f", {len(heads)} discriminator heads with a cross-rank softmax)" if heads else ")"))
    scope = checkpointing(activation_checkpointing)
    if scope == "mlp":
        mlps = [m for b in blocks for m in (b.x_mlp, b.c_mlp) if m is not None]
        apply_activation_checkpointing(mlps + list(extra_blocks))
        applied.append(f"selective activation checkpointing ({len(mlps)} MLPs of {len(blocks)} blocks"
                       + (f", {len(extra_blocks)} extra blocks whole)" if extra_blocks else ")"))
    elif scope == "attention":
        n = apply_activation_checkpointing(blocks, keep_attention=True)
        apply_activation_checkpointing(list(extra_blocks))
        applied.append(f"selective activation checkpointing ({n} blocks recomputed but their attention kernels"
                       + (f", {len(extra_blocks)} extra blocks whole)" if extra_blocks else ")"))
    elif scope:
        n = apply_activation_checkpointing(blocks + list(extra_blocks))
        applied.append(f"activation checkpointing ({n} blocks)")
    if compile:
        backend = compile if isinstance(compile, str) else "inductor"
        for block in blocks:
            compile_block(block, backend)
        applied.append("torch.compile per block" + ("" if backend == "inductor" else f" (backend {backend})"))
    model._apt_parallel_dims = dims
    log.info("parallelize %s: %s", type(model).__name__, "; ".join(applied) if applied else "nothing (single rank)")
    return model
