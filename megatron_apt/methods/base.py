"""What the training methods share. A method owns its models and losses and performs one optimizer update
(of G, for APT) per `train_step` over this rank's micro-batches of an exact global batch. It knows neither the
trainer nor the engines' types: the trainer hands it a `MethodContext` (how to build a model for this
layout, how to wrap it in an engine, the executor that runs passes, the batch arithmetic).

Micro-batches handed to `train_step`: dict(x [B,C,T,H,W], text [B,L,Dt], text_mask [B,L] bool,
positions: global-batch positions of the B samples (for per-sample noise), weight: 0.0 for a padding
micro-step that must still run (ZeRO-3 gathers parameters collectively) else 1.0).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

import torch

from megatron_apt.methods.randomness import per_sample_rand, per_sample_randn
from megatron_apt.parallel.execution import Item


@dataclass
class MethodContext:
    cfg: Any
    """The TrainConfig."""
    device: torch.device
    executor: Any
    """Runs passes: `parallel.execution.LocalExecutor` or `PipelineExecutor`."""
    build: Callable
    """build(kind, path, *, dcfg=None, head_seed=None) -> the model ("velocity", "generator" or
    "discriminator") of a model directory (None: a fresh velocity model), cut and parallelised for this
    layout."""
    engine: Callable
    """engine(module, lr) -> a training engine around it."""
    loss_scale: float
    """dp / global batch: a micro-batch's summed loss times this averages over the exact global batch."""
    global_mean: Callable
    """global_mean(total, count) -> the mean over data parallel of per-sample sums."""
    encode_prompt: Callable
    """encode_prompt(text) -> ([1, L, D] features, [1, L] mask) as the data set's captions, or None for ""."""


def per_sample_mse(out, target):
    return (out.float() - target.float()).pow(2).flatten(1).mean(1)


def bcast(t):
    """[B] -> [B, 1, 1, 1, 1]."""
    return t.view(-1, 1, 1, 1, 1)


class Method(abc.ABC):
    name = "base"

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.ex = ctx.executor

    # ---- per-sample randomness (methods.randomness) ----
    def noise(self, mb, step, purpose):
        x = mb["x"]
        return per_sample_randn(x.shape[1:], self.cfg.seed, step, purpose, mb["positions"], x.device, x.dtype)

    def uniform(self, mb, step, purpose):
        return per_sample_rand(self.cfg.seed, step, purpose, mb["positions"], mb["x"].device, torch.float32)

    # ---- the exact global batch ----
    def scale(self, mb) -> float:
        return self.ctx.loss_scale * mb["weight"]

    def mse_loss(self, per, mb):
        """(the micro-batch's scaled loss, its metric sums) from per-sample losses."""
        w = mb["weight"]
        return per.sum() * self.scale(mb), {"loss": float(per.detach().sum()) * w, "n": len(per) * w}

    def finish_mse_step(self, sums: dict[str, float], ema_decay: float | None) -> dict[str, float]:
        """Optimizer step (and EMA) of the single-model methods; the step's mean loss and gradient norm."""
        gnorm = self.engine.step()
        if ema_decay is not None:
            self.engine.update_ema(ema_decay)
        return {"loss": self.ctx.global_mean(sums.get("loss", 0.0), sums.get("n", 0.0)), "grad_norm": gnorm}

    # ---- what the trainer asks of a method ----
    @abc.abstractmethod
    def engines(self) -> dict[str, Any]:
        """The engines this method trains, by name (their checkpoints and exports are named so)."""

    @abc.abstractmethod
    def train_step(self, step: int, micro_batches: list[dict]) -> dict[str, float]:
        """One update on the step's micro-batches; returns its losses and metrics."""

    def model_flops(self, x_shape, text_len: int) -> float:
        return float("nan")

    @torch.no_grad()
    def sample(self, z, text, mask):
        """One-step samples x = z - v(z, t = 1) of the method's product, where the model's output is (the
        last pipeline stage); None elsewhere."""
        eng = self.engines().get("G")
        if eng is not None:
            out = self.ex.forward(eng, [Item(z, None, text, mask, {})])
            return None if out is None else out[0]
        t = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
        out = self.ex.forward(self.engines()["model"], [Item(z, t, text, mask, {})])
        return None if out is None else z - out[0]
