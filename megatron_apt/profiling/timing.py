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


# ------------------------------------------------------------------------------------------------------
# where one call's time goes (torch.profiler)
# ------------------------------------------------------------------------------------------------------
# Kernel families by name. cuBLAS / CUTLASS GEMMs are named *gemm* / nvjet* / sm90_xmma*; the attention
# kernels are flash / fmha / cudnn SDPA (on a CPU: the aten ops of the same names). Casts and copies between
# tensors are elementwise work on both devices; "copy" is memory transfers and fills.
_FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    # cuDNN's convolution kernels (*xmma_fprop_implicit_gemm*, *dgrad*, *wgrad*, *implicit_convolve*: checked
    # before matmul, they are xmma kernels too) and the aten convolution ops; not "conv" alone, which would
    # take in the convert (cast) kernels
    ("convolution", ("convolution", "convolve", "conv1d", "conv2d", "conv3d", "slow_conv", "fprop", "dgrad",
                     "wgrad", "winograd")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("communication", ("nccl", "gloo", "all_gather", "reduce_scatter", "all_reduce")),
    ("copy", ("memcpy", "memset")),  # transfers and fills; dtype casts are elementwise kernels
)


def kernel_family(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_"):  # inductor's fused kernels, named after every op they absorb (a convolution's
        return "elementwise and other"  # bias and activation too): the matmuls and convolutions stay extern calls
    for fam, keys in _FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "elementwise and other"


def kernel_breakdown(fn: Callable[[], Any], device: torch.device, top: int = 15) -> dict[str, Any]:
    """One call of `fn` under torch.profiler: its wall time, the time the device spent in kernels (their
    self time summed; on a CPU, the aten ops' self time), that time by kernel family (attention, convolution,
    matmul, communication, copy, elementwise and other) and the `top` kernels. busy / wall below 1 is time the device
    waited on the host: launch overhead, synchronisation, Python."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        wall = time.perf_counter() - t0
    kernels: dict[str, float] = {}
    for e in prof.key_averages():
        if cuda:
            # a CPU op's device time is its kernels', counted there; a record_function range (the optimizer's
            # step, zero_grad) appears as a device event spanning kernels counted on their own
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            us = e.self_device_time_total
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            kernels[e.key] = kernels.get(e.key, 0.0) + us / 1e6
    busy = sum(kernels.values())
    fams: dict[str, float] = {}
    for name, s in kernels.items():
        fam = kernel_family(name)
        fams[fam] = fams.get(fam, 0.0) + s
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {
        "wall_s": wall, "busy_s": busy, "busy_over_wall": busy / wall if wall > 0 else None,
        "source": "CUDA kernels' self time" if cuda else "aten ops' self CPU time",
        "families_s": dict(sorted(fams.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n[:160], "seconds": s, "family": kernel_family(n)} for n, s in ranked],
    }


def print_kernels(k: dict[str, Any], what: str, indent: str = "  ") -> None:
    """Print a kernel_breakdown result: busy against wall, the families, the longest kernels."""
    print(f"{indent}{what} under torch.profiler: {k['wall_s']:.3f} s wall, {k['busy_s']:.3f} s busy "
          f"({k['source']}; busy/wall {k['busy_over_wall']:.1%})")
    print(f"{indent}  by family: " + ", ".join(f"{f} {s:.3f} s ({s / k['busy_s']:.0%})"
                                             for f, s in k["families_s"].items()))
    for e in k["top"]:
        print(f"{indent}  {e['seconds']:8.4f} s  {e['family']:<22} {e['name'][:110]}")


def recompile_limit_hits() -> int:
    """How often dynamo gave up on a function past its recompile limit (it then runs it eagerly for good)."""
    from torch._dynamo.utils import counters

    return sum(n for k, n in counters["unimplemented"].items() if "recompile limit" in str(k).lower())
