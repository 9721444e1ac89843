"""Helpers for multi-rank tests on CPU: spawn N gloo processes running a module-level function."""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report the whole traceback to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_apt.parallel.state import destroy_model_parallel

            destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, *args, timeout: float = 300.0):
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; returns the per-rank results.

    A failure on any rank raises with that rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors or len(results) != world_size:
        raise RuntimeError("\n".join(errors) or f"only {len(results)} of {world_size} ranks reported")
    return [results[r] for r in range(world_size)]


def tree_hash(path) -> str:
    """A hash of every file name and byte under `path` (to show an input was left untouched)."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_tool(name: str, *args) -> int:
    """Call the tool's main() (megatron_apt/cli/<name>.py, the code behind tools/<name>.py) in this process and
    return its exit code."""
    import importlib

    tool = importlib.import_module(f"megatron_apt.cli.{name}")
    return tool.main([str(a) for a in args])


def save_debug_models(base):
    """The `debug` preset's diffusion model (base/diff, seed 1) and consistency-distilled G-hat (base/cd,
    seed 2), with non-zero adaLN gates so every parameter gets a gradient. Returns base."""
    from pathlib import Path

    from megatron_apt.models import build_mmdit
    from megatron_apt.checkpoint.model_dir import save_mmdit

    base = Path(base)
    save_mmdit(build_mmdit("debug", zero_init=False, seed=1), base / "diff")
    save_mmdit(build_mmdit("debug", zero_init=False, seed=2), base / "cd", kind="consistency")
    return base


def train_worker(rank: int, world: int, overrides: list[str]) -> list[dict]:
    """Run the trainer with dotted overrides on this rank (for run_distributed); its numeric history."""
    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.trainer import Trainer

    hist = Trainer(load_config(None, overrides)).train()
    return [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in hist]
