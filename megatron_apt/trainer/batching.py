"""Exact global batches.

A configured global batch of N samples contains exactly N samples, whatever N, the data-parallel size
and the micro-batch are (the paper's 9062 on 256 GPUs does not divide): data-parallel rank r takes
N // dp samples, plus one for the first N % dp ranks; it cuts them into micro-batches of at most `micro`
samples; every rank runs the same number of micro-steps (a rank with no sample left runs a weight-0
micro-step, because ZeRO-3 gathers parameters collectively). Each micro-batch's summed loss is scaled by
dp / N, so that gradients averaged over the data-parallel x sequence-parallel group equal the gradient
of the mean loss over the N samples.

Noise, timesteps and dropout are drawn per sample (`methods.randomness`), so the update does not depend on
how the samples are spread over ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    dp: int
    micro: int
    counts: tuple[int, ...]
    """Samples of each data-parallel rank."""
    micro_steps: int
    """Micro-steps per update on every rank."""

    def rank_slice(self, r: int) -> tuple[int, int]:
        start = sum(self.counts[:r])
        return start, start + self.counts[r]

    def micro_batches(self, r: int) -> list[tuple[int, int]]:
        """(start, stop) positions within the global batch for each micro-step of rank r; empty ones are
        (start, start)."""
        a, b = self.rank_slice(r)
        out = []
        for m in range(self.micro_steps):
            s = min(a + m * self.micro, b)
            out.append((s, min(s + self.micro, b)))
        return out

    def loss_scale(self) -> float:
        return self.dp / self.global_batch

    def describe(self) -> str:
        lo, hi = min(self.counts), max(self.counts)
        sizes = f"{lo}" if lo == hi else f"{lo}-{hi}"
        return (f"global batch {self.global_batch} = {self.dp} data-parallel ranks x {sizes} samples, "
                f"{self.micro_steps} micro-steps of <= {self.micro}")


def plan_batch(global_batch: int, dp: int, micro: int) -> BatchPlan:
    if dp < 1 or micro < 1:
        raise ValueError(f"data-parallel size ({dp}) and micro-batch ({micro}) must be >= 1")
    if global_batch < dp:
        raise ValueError(f"global batch {global_batch} cannot be formed over {dp} data-parallel ranks: every rank "
                         f"needs at least one sample (use a global batch >= {dp} or fewer ranks)")
    counts = tuple(global_batch // dp + (1 if r < global_batch % dp else 0) for r in range(dp))
    return BatchPlan(global_batch, dp, micro, counts, math.ceil(max(counts) / micro))
