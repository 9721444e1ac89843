"""Parameter counts of the networks a stage trains, as the trainer builds them: tensor-parallel local sizes, ZeRO-3 partitions and persistence, ZeRO-1 shards."""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

import torch

from megatron_apt.config.model import DiscriminatorConfig, MMDiTConfig
from megatron_apt.config.train import STAGES


# parameters
# ------------------------------------------------------------------------------------------------------
# parameters of the backbone's blocks, the only ones tensor parallel splits (G and D hold it as .backbone)
_BLOCK_PARAM = re.compile(r"^(?:backbone\.)?blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _tp_kinds() -> dict[str, str]:
    from megatron_apt.parallel.tensor_parallel import BLOCK_PLAN

    return dict(BLOCK_PLAN)


def tp_local_numel(name: str, numel: int, tp: int, kinds: dict[str, str] | None = None) -> int:
    """Elements of parameter `name` on one tensor-parallel rank (the plan of parallel.tensor_parallel:
    column-parallel weights and biases and row-parallel weights are split, everything else is whole)."""
    if tp == 1:
        return numel
    kinds = kinds if kinds is not None else _tp_kinds()
    m = _BLOCK_PARAM.search(name)
    if not m:
        return numel
    kind = kinds.get(m.group(2))
    if kind == "column" or (kind == "row" and m.group(3) == "weight"):
        if numel % tp:
            raise ValueError(f"{name} ({numel} elements) does not split over tensor parallel {tp}")
        return numel // tp
    return numel


@dataclass
class NetCount:
    """One network as one rank holds it."""

    name: str
    total: int
    """Parameters of the whole network."""
    local: int
    """Parameters on one tensor-parallel rank."""
    partition: int
    """ZeRO-3 shard elements on one rank: sum over parameters of ceil(local / zero_world)."""
    persistent: int
    """Elements of parameters small enough to stay whole on every rank (ZeRO-3 persistence threshold)."""
    largest_block: int
    """Tensor-parallel-local elements of the largest transformer block (the gathered working set)."""
    unused: int = 0
    """Tensor-parallel-local elements that no forward reaches (D's output head and any block past its deepest
    head layer): they never get a gradient, so torch optimizers keep no state for them (ZeRO-3's flat
    shards do)."""
    trainable: bool = True
    zero1_shard: int = 0
    """Pipeline engine: elements with optimizer state on the data-parallel rank that holds the most under
    ZeRO-1 (see the function `zero1_shard`); without ZeRO-1, every element that gets a gradient."""


def _unused(module: torch.nn.Module, pname: str) -> bool:
    """Parameters no forward of this network reaches."""
    layers = getattr(module, "head_layers", None)
    if layers:  # the discriminator stops after its deepest head layer (features_at); [] on other pipeline stages
        if pname.startswith(("backbone.norm_out.", "backbone.proj_out.")):
            return True
        m = _BLOCK_PARAM.search(pname)
        if m and int(m.group(1)) >= max(layers):
            return True
    # SD3 checkpoints keep a text query in the last (context-pre-only) block that is never used
    m = _BLOCK_PARAM.search(pname)
    backbone = getattr(module, "backbone", module)
    if m and (".c_q." in "." + m.group(2) + "." or ".c_norm_q." in "." + m.group(2) + "."):
        blocks = backbone.blocks  # a pipeline stage keeps its blocks in a ModuleDict keyed by block index
        block = blocks[m.group(1)] if isinstance(blocks, torch.nn.ModuleDict) else blocks[int(m.group(1))]
        return bool(block.context_pre_only)
    return False


def count_network(module: torch.nn.Module, name: str, tp: int, zero_world: int, persistence_threshold: int,
                  trainable: bool = True) -> NetCount:
    kinds = _tp_kinds()
    total = local = partition = persistent = unused = 0
    blocks: dict[int, int] = {}
    for pname, p in module.named_parameters():
        n = p.numel()
        nl = tp_local_numel(pname, n, tp, kinds)
        total += n
        local += nl
        partition += -(-nl // zero_world)
        if nl <= persistence_threshold:
            persistent += nl
        if _unused(module, pname):
            unused += nl
        m = _BLOCK_PARAM.search(pname)
        if m:
            blocks[int(m.group(1))] = blocks.get(int(m.group(1)), 0) + nl
    return NetCount(name, total, local, partition, persistent, max(blocks.values(), default=0), unused, trainable)


def zero1_shard(module: torch.nn.Module, tp: int, dp: int) -> int:
    """Elements with optimizer state on the most loaded of `dp` ranks under torch's ZeroRedundancyOptimizer:
    it gives whole parameters, largest first (a stable sort), each to the rank with the fewest elements so
    far (the lowest rank on a tie); state exists only for parameters that get a gradient."""
    kinds = _tp_kinds()
    params = [(tp_local_numel(n, p.numel(), tp, kinds), not _unused(module, n)) for n, p in module.named_parameters()
              if p.requires_grad]
    heap = [(0, r) for r in range(max(dp, 1))]
    state = [0] * max(dp, 1)
    for n, used in sorted(params, key=lambda x: x[0], reverse=True):
        size, r = heapq.heappop(heap)
        heapq.heappush(heap, (size + n, r))
        if used:
            state[r] += n
    return max(state)


def build_networks(stage: str, model_cfg: MMDiTConfig, dcfg: DiscriminatorConfig | None = None
                   ) -> dict[str, torch.nn.Module]:
    """The stage's networks on the meta device, as the trainer builds them (Trainer.build_model)."""
    from megatron_apt.models import Discriminator, MMDiT, OneStepGenerator

    with torch.device("meta"):
        if stage in ("apt_image", "apt_video"):
            return {"G": OneStepGenerator(MMDiT(model_cfg)), "D": Discriminator(MMDiT(model_cfg), dcfg)}
        if stage == "cd":
            return {"model": MMDiT(model_cfg), "teacher": MMDiT(model_cfg)}
        if stage == "flow":
            return {"model": MMDiT(model_cfg)}
    raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
