"""Timing (CUDA events on a GPU, the slowest rank's time under a process group) and peak memory."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch


# ------------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device, group=None) -> list[float]:
    """Seconds of each timed call (CUDA events on a GPU); under a process group every call starts after a
    barrier and each call's time is the slowest rank's."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group=group)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    if group is not None:
        t = torch.tensor(times, dtype=torch.float64, device=device if dist.get_backend(group) == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times = t.tolist()
    return times


def mem_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def mem_peak_gib(device: torch.device) -> float:
    """Peak allocated device memory since the last reset; on a CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def mem_source(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "host peak RSS (ru_maxrss, never reset)"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def summary(times: list[float]) -> dict[str, Any]:
    return {"seconds": sum(times) / len(times), "seconds_min": min(times), "seconds_all": times}


def free(device: torch.device) -> None:
    """Return the memory of deleted models to the device (a full gc pass costs seconds on a CPU after the
    transformers/diffusers imports, and frees nothing there that reference counting has not)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
