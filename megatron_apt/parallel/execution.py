"""How a training method's passes run: whole models on this rank, or pipeline stages under megatron-core's
schedule. A method (`megatron_apt.methods`) is written once against this interface; the two executors
below differ only in how they run the micro-batches, so PP = 1 and PP > 1 train the same way.

A pass takes `Item`s (one per micro-batch: the model inputs and whatever the loss needs) and a model, which
is an engine of `megatron_apt.trainer.engines` (`__call__` with the engine's bookkeeping, `raw` without,
`backward`) or a frozen model (`Frozen`):

* `forward(model, items)`: forward only, under no_grad; the outputs where the model's output is (every
  rank here, the last pipeline stage there), else None.
* `forward_backward(model, items, loss_fn)`: forward, loss_fn(output, item) -> (loss, metrics dict) where the
  output is, backward into the model's gradients; returns the metric dicts (on the output's rank).
* `forward_backward_through(first, second, items, second_item, loss_fn)`: the loss of second(first(x))
  differentiated into `first` only (`second` frozen): APT's generator step (Eq. 2) through D.
* `last_to_first(tensors, like)`: outputs of one model that feed another move to where inputs are read.
* `reduce(dicts, keys)`: a pass's metric dicts summed, on every rank of the pipeline.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_apt.parallel.pipeline import PipeItem as Item
from megatron_apt.parallel.pipeline import PipelineRunner

__all__ = ["Frozen", "Item", "LocalExecutor", "PipelineExecutor"]


class Frozen:
    """A model that is only ever run forward (CD's teacher): inputs cast to its dtype, no gradients."""

    def __init__(self, module: torch.nn.Module):
        self.module = module.requires_grad_(False).eval()

    def raw(self, *args):
        dt = next(self.module.parameters()).dtype
        args = [a.to(dt) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.no_grad():
            return self.module(*args)


def _args(item: Item):
    """A generator's backbone always sees t = T (Eq. 5): its items carry no t and it takes (z, text, mask)."""
    if item.t is None:
        return (item.x, item.text, item.text_mask)
    return (item.x, item.t, item.text, item.text_mask) + ((item.pooled,) if item.pooled is not None else ())


def _sum(dicts) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


class LocalExecutor:
    """Whole models on this rank (the torch and DeepSpeed engines): micro-batch by micro-batch."""

    is_first = is_last = True

    def forward(self, model, items: list[Item]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model.raw(*_args(it)) for it in items]

    def forward_backward(self, model, items: list[Item], loss_fn: Callable) -> list[dict]:
        out = []
        for it in items:
            loss, metrics = loss_fn(model(*_args(it)), it)
            model.backward(loss)
            out.append(metrics)
        return out

    def forward_backward_through(self, first, second, items: list[Item], second_item: Callable,
                                 loss_fn: Callable) -> list[dict]:
        out = []
        for it in items:
            # `first` runs through its engine (its backward bookkeeping), the frozen `second` without
            loss, metrics = loss_fn(second.raw(*_args(second_item(first(*_args(it)), it))), it)
            first.backward(loss)
            out.append(metrics)
        return out

    def last_to_first(self, tensors, like):
        return tensors

    def reduce(self, dicts, keys) -> dict[str, float]:
        s = _sum(dicts)
        return {k: s.get(k, 0.0) for k in keys}


class PipelineExecutor:
    """Pipeline stages (`parallel.pipeline`) run by megatron-core's schedules over the pipeline group.

    Every stage of a data-parallel rank reads the same micro-batches and draws the same per-sample noise, so
    what the first stage needs and what the last stage's loss needs are where they are used; only outputs
    that feed another model (G's samples into D, the teacher's ODE step into the EMA target) move from the
    last stage to the first."""

    def __init__(self, device: torch.device, autocast_dtype: torch.dtype | None = None):
        self.runner = PipelineRunner(autocast_dtype=autocast_dtype)
        self.device = device
        self.is_first, self.is_last = self.runner.is_first, self.runner.is_last

    def forward(self, model, items):
        with torch.no_grad():
            out = self.runner.run(model.module, items, None, forward_only=True)
        return out if self.is_last else None

    def forward_backward(self, model, items, loss_fn, input_hook=None):
        return self.runner.run(model.module, items, loss_fn, input_hook=input_hook)

    def forward_backward_through(self, first, second, items, second_item, loss_fn):
        """Both are pipelines over the same stages: `first` runs forward only, its outputs move to the first
        stage, `second` (frozen) runs forward and backward to get dL/d(output) there, which moves back to the
        last stage, where `first` runs forward and backward on the surrogate <output, dL/d(output)>: its
        parameter gradient is exactly dL/d(first). The price is one extra forward of `first`."""
        outs = self.last_to_first(self.forward(first, items), [it.x for it in items])
        sitems = [second_item(o, it) for o, it in zip(outs, items)]

        def leaf(item):  # the first stage's input becomes a leaf that collects dL/d(output)
            item.extra["_leaf"] = item.x.detach().requires_grad_(True)
            return item.extra["_leaf"]

        metrics = self.runner.run(second.module, sitems, loss_fn, input_hook=leaf)
        grads = [s.extra["_leaf"].grad.float() for s in sitems] if self.is_first else None
        grads = self._move(grads, [it.x for it in items], self.runner.first_to_last)
        gitems = [Item(it.x, it.t, it.text, it.text_mask, {"_g": g}, it.pooled) for it, g in zip(items, grads)]
        self.runner.run(first.module, gitems, lambda o, item: ((o.float() * item.extra["_g"]).sum(), {}))
        return metrics

    def last_to_first(self, tensors, like):
        return self._move(tensors, like, self.runner.last_to_first)

    @staticmethod
    def _move(tensors, like, how):
        got = how(tensors, [tuple(x.shape) for x in like], torch.float32)
        return got if got is not None else [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in like]

    def reduce(self, dicts, keys) -> dict[str, float]:
        """Summed on the last stage and broadcast to every stage (the caller then averages over data parallel)."""
        s = _sum(dicts)
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        vec = torch.tensor([float(s.get(k, 0.0)) for k in keys], dtype=torch.float64, device=dev)
        vec = self.runner.broadcast_from_last(vec)
        return {k: float(v) for k, v in zip(keys, vec.cpu().tolist())}

