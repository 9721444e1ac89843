"""Training checkpoints: the on-disk format the trainer writes and resumes from.

    run_dir/checkpoints/step-00000350/
        rank00000.safetensors   this rank's engine state (parameters or ZeRO-3 flat partitions, optimizer
                                state, EMA; engine-prefixed: "G.", "D.", "model.")
        rank00000.json          how those tensors map to parameters (the engines' `layout()`), and the
                                rank's place in the layout (tp, pp and ZeRO ranks)
        trainer.json            step, model configs and kinds, the layout fingerprint, counters, and every
                                file's size and XXH3 checksum (`checkpoint.integrity`)

A checkpoint is written into `.step-N.partial` and renamed into place only after every rank has written and
hashed its files, so a visible `step-N` is always complete; the oldest are removed beyond `keep`. Before
anything is written the free space is checked against the checkpoint's size, so a full disk stops the run
with a clear message and the previous checkpoint untouched. On resume every rank verifies its own files; a
damaged newest checkpoint is set aside as `step-N.damaged` and the previous one is used.
`checkpoint.convert` reads the same format offline (consolidate, reshard, export).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_apt.checkpoint import integrity
from megatron_apt.checkpoint.integrity import CheckpointError
from megatron_apt.parallel.comm import all_ranks_true
from megatron_apt.utils import atomic_write_json, fsync_dir, get_logger

log = get_logger("megatron_apt.checkpoint")

VERSION = 2  # 2: trainer.json records every file's size and checksum
FREE_SPACE_MARGIN = 1.05  # written bytes x this (+ 64 MiB) must be free before a save starts


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def engine_tensors(engines: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's checkpoint tensors of every engine, prefixed with the engine's name."""
    tensors = {}
    for ename, eng in engines.items():
        for k, v in eng.state_tensors().items():
            tensors[f"{ename}.{k}"] = v.detach().cpu().contiguous()
        if eng.kind == "deepspeed":  # ZeRO-3 state holds no buffers (e.g. SD3's sin-cos table)
            for k, b in eng.module.named_buffers():
                tensors[f"{ename}.buffer.{k}"] = b.detach().cpu().contiguous()
    return tensors


class CheckpointStore:
    """The checkpoints of one run folder, for the ranks of one training job (every rank calls every method)."""

    def __init__(self, ckpt_dir: str | Path, device: torch.device, keep: int = 2):
        self.dir = Path(ckpt_dir)
        self.device = device
        self.keep = max(1, int(keep))

    def latest(self) -> Path | None:
        done = integrity.complete_checkpoints(self.dir)
        return done[0] if done else None

    # ---- writing ----
    def save(self, step: int, engines: dict[str, Any], rank_layout: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write step `step`: this rank's tensors and layout, then (rank 0) trainer.json with `meta`, the
        version, the step, the world size and the file table; rename into place; drop the oldest."""
        t0 = time.perf_counter()
        name = f"step-{step:08d}"
        final, tmp = self.dir / name, self.dir / f".{name}.partial"
        tensors = engine_tensors(engines)
        self._check_free_space(sum(v.numel() * v.element_size() for v in tensors.values()), name)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        # the folder is renamed into place only when every rank has written: no partial step-N is ever visible
        save_file(tensors, str(tmp / f"rank{_rank():05d}.safetensors"))
        layout = {"rank": _rank(), **rank_layout, "engines": {n: e.layout() for n, e in engines.items()}}
        atomic_write_json(tmp / f"rank{_rank():05d}.json", layout)
        files = self._gather_digests(tmp)
        if _rank() == 0:
            atomic_write_json(tmp / integrity.TRAINER_META, {"version": VERSION, "step": step,
                                                              "world_size": _world(), **meta, "files": files})
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            for old in integrity.step_dirs(self.dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            size = sum(int(f["size"]) for f in files.values())
            log.info("saved checkpoint %s: %.2f GiB in %.1f s (%d file(s), keeping the last %d)", final,
                     size / 2**30, time.perf_counter() - t0, len(files) + 1, self.keep)
        _barrier()
        return final

    def _check_free_space(self, my_bytes: int, name: str) -> None:
        """Refuse, before anything is written, a save that would not fit (the previous checkpoint stays)."""
        total = torch.tensor([my_bytes], dtype=torch.int64)
        if _world() > 1:
            if dist.get_backend() == "nccl":
                total = total.to(self.device)
            dist.all_reduce(total)
        need = int(int(total.item()) * FREE_SPACE_MARGIN) + (64 << 20)
        free = _free_bytes(self.dir) if _rank() == 0 else need
        if not all_ranks_true(free >= need, self.device):
            last = self.latest()
            raise CheckpointError(
                f"not enough free space in {self.dir} for {name}: it needs {need / 2**30:.2f} GiB, "
                f"{free / 2**30:.2f} GiB are free (rank 0's view); nothing was written"
                + (f" and {last.name} is intact" if last else "")
                + ". Free space (or lower keep_checkpoints) and rerun: it resumes from the last checkpoint")

    def _gather_digests(self, folder: Path) -> dict[str, dict]:
        """Every rank hashes the files it wrote (right after writing: from the page cache); rank 0 receives
        all sizes and checksums (one all-gather of int64s) for trainer.json."""
        mine = []
        for fname in integrity.rank_files(_rank()):
            size, digest = integrity.file_digest(folder / fname)
            mine += [size, integrity.to_int64(digest)]
        t = torch.tensor(mine, dtype=torch.int64)
        world = _world()
        if world > 1:
            if dist.get_backend() == "nccl":
                t = t.to(self.device)
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t)
        else:
            parts = [t]
        files = {}
        for r, part in enumerate(parts):
            vals = part.cpu().tolist()
            for i, fname in enumerate(integrity.rank_files(r)):
                files[fname] = integrity.digest_record(vals[2 * i], integrity.from_int64(vals[2 * i + 1]))
        return files

    # ---- reading ----
    def check(self, path: Path) -> str | None:
        """This rank's verdict on a checkpoint: None if trainer.json and this rank's files are intact (sizes,
        checksums, a readable safetensors header), else the reason, naming the file."""
        try:
            meta = integrity.read_trainer_meta(path)
            if meta.get("world_size") != _world():
                return None  # a layout mismatch, not damage: `load` says so
            integrity.verify_files(path, meta, integrity.rank_files(_rank()))
            f = path / f"rank{_rank():05d}.safetensors"
            try:
                with safe_open(str(f), framework="pt", device="cpu") as h:
                    h.keys()
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise CheckpointError(f"{f} cannot be read: {' '.join(str(e).split())}") from None
            json.loads((path / f"rank{_rank():05d}.json").read_text())
        except CheckpointError as e:
            return str(e)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"{path}: {' '.join(str(e).split())}"
        return None

    def resume(self, load: Callable[[Path], Any]) -> Path | None:
        """Call `load(path)` on the newest intact checkpoint and return its path. Each rank checks its own
        files; a checkpoint any rank finds damaged is reported (naming the file), set aside as
        `step-N.damaged` and the previous one is tried. If every checkpoint is damaged: CheckpointError
        (nothing is set aside then)."""
        damaged: list[tuple[Path, str]] = []
        for path in integrity.complete_checkpoints(self.dir):
            reason = self.check(path)
            if all_ranks_true(reason is None, self.device):
                if damaged:
                    log.warning("resuming from %s instead: the newer checkpoint(s) %s are set aside as *.damaged",
                                path, ", ".join(p.name for p, _ in damaged))
                    if _rank() == 0:
                        for p, _ in damaged:
                            aside = p.with_name(p.name + ".damaged")
                            shutil.rmtree(aside, ignore_errors=True)
                            os.replace(p, aside)
                    _barrier()
                load(path)
                return path
            damaged.append((path, reason or "damaged on another rank"))
            if reason is not None:
                log.warning("checkpoint %s is damaged: %s; falling back to the previous one", path.name, reason)
        if damaged:
            raise CheckpointError(f"no intact checkpoint left in {self.dir}: "
                                  + "; ".join(f"{p.name}: {r}" for p, r in damaged)
                                  + ". Move the folders away to start this run afresh")
        return None

    def load(self, path: Path, engines: dict[str, Any], fingerprint: dict[str, Any], pipeline: bool) -> dict:
        """Load this rank's tensors of `path` into the engines after checking that the checkpoint was written
        by the same layout and model shapes (`fingerprint`); returns its trainer.json."""
        meta = integrity.read_trainer_meta(path)
        old = meta.get("fingerprint", {})
        if pipeline:  # pipeline stages hold different parameters: compare with this rank's own record
            mine = path / f"rank{_rank():05d}.json"
            lay = json.loads(mine.read_text())["engines"] if mine.is_file() else {}
            old = {**old, "shapes": {n: {q[0]: q[1] for q in e.get("params", [])} for n, e in lay.items()}}
        if old.get("layout") != fingerprint["layout"] or meta.get("world_size") != _world():
            raise ValueError(f"checkpoint {path} was written with layout tp,sp,dp,pp={old.get('layout')} on "
                             f"{meta.get('world_size')} ranks; this run has {fingerprint['layout']} on {_world()}. "
                             "Resume needs the same layout (consolidate and start a new run to change it).")
        if old.get("shapes") != fingerprint["shapes"]:
            from megatron_apt.models.discriminator import check_head_layout

            check_head_layout(old.get("shapes", {}).get("D", {}), f"checkpoint {path}")
            raise ValueError(f"checkpoint {path} was written by a model of another shape or kind; refusing to resume "
                             f"(use another run_dir, or the checkpoint tools to convert it)")
        f = path / f"rank{_rank():05d}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no shard for rank {_rank()} ({f.name})")
        try:
            tensors = load_file(str(f), device=str(self.device))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{f} cannot be read: {' '.join(str(e).split())}") from None
        for ename, eng in engines.items():
            pre = f"{ename}."
            eng.load_state_tensors({k[len(pre):]: v for k, v in tensors.items()
                                    if k.startswith(pre) and not k.startswith(pre + "buffer.")})
        return meta
