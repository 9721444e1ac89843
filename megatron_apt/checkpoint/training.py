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
`TrainingCheckpoint` below reads the same format offline (for `consolidate`, `export_generator`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
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
from megatron_apt.utils import atomic_write_json, bytes_needed, fsync_dir, get_logger
from megatron_apt.utils import free_bytes as _free_bytes  # one name the tests can replace (a simulated full disk)
from megatron_apt.config.model import MMDiTConfig
from dataclasses import dataclass
from megatron_apt.checkpoint.common import ConversionError, TRAINER_META, VerificationError, numel, read_json, read_tensors, safetensors_keys, check_state, expected_shapes, head_mlp_ratio_from, model_buffers
from megatron_apt.checkpoint.model_dir import CONFIG_NAME
from megatron_apt.checkpoint.tensor_parallel import merge_tp_shards

log = get_logger("megatron_apt.checkpoint")

VERSION = 2  # 2: trainer.json records every file's size and checksum


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def engine_tensors(engines: dict[str, Any], snapshot: bool = False) -> dict[str, torch.Tensor]:
    """This rank's checkpoint tensors of every engine, prefixed with the engine's name. `snapshot` copies even
    tensors already in host memory (a CPU run), so that training may go on changing them while they are written."""
    def host(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=snapshot).contiguous()

    tensors = {}
    for ename, eng in engines.items():
        for k, v in eng.state_tensors().items():
            tensors[f"{ename}.{k}"] = host(v)
        if eng.kind == "deepspeed":  # ZeRO-3 state holds no buffers (e.g. SD3's sin-cos table)
            for k, b in eng.module.named_buffers():
                tensors[f"{ename}.buffer.{k}"] = host(b)
    return tensors


def ranks_fit(folder: Path, my_bytes: int, device: torch.device) -> tuple[bool, int, int]:
    """Whether what every rank is about to write (its `my_bytes`, summed over the world) fits in the free space
    of `folder` (rank 0's view): the same verdict on every rank, with the bytes needed and free."""
    total = torch.tensor([int(my_bytes)], dtype=torch.int64)
    if _world() > 1:
        if dist.get_backend() == "nccl":
            total = total.to(device)
        dist.all_reduce(total)
    need = bytes_needed(int(total.item()))
    free = _free_bytes(folder) if _rank() == 0 else need
    return all_ranks_true(free >= need, device), need, free


class CheckpointStore:
    """The checkpoints of one run folder, for the ranks of one training job (every rank calls every method)."""

    def __init__(self, ckpt_dir: str | Path, device: torch.device, keep: int = 2, async_save: bool = False):
        self.dir = Path(ckpt_dir)
        self.device = device
        self.keep = max(1, int(keep))
        self.async_save = async_save
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        # a background write exchanges its digests and meets the other ranks over a gloo group of its own, so
        # that its collectives never interleave with the training step's on the default group
        self._group = dist.new_group(backend="gloo") if async_save and _world() > 1 else None

    def wait(self) -> None:
        """Block until a background save has finished; raise its error here if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._writer_error is not None:
            err, self._writer_error = self._writer_error, None
            raise err

    def latest(self) -> Path | None:
        done = integrity.complete_checkpoints(self.dir)
        return done[0] if done else None

    # ---- writing ----
    def save(self, step: int, engines: dict[str, Any], rank_layout: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write step `step`: this rank's tensors and layout, then (rank 0) trainer.json with `meta`, the
        version, the step, the world size and the file table; rename into place; drop the oldest."""
        self.wait()  # one save at a time: the previous background write first (its error surfaces here)
        t0 = time.perf_counter()
        name = f"step-{step:08d}"
        final, tmp = self.dir / name, self.dir / f".{name}.partial"
        tensors = engine_tensors(engines, snapshot=self.async_save)
        layout = {"rank": _rank(), **rank_layout, "engines": {n: e.layout() for n, e in engines.items()}}
        self._check_free_space(sum(v.numel() * v.element_size() for v in tensors.values()), name)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        if not self.async_save:
            self._write(step, tensors, layout, meta, final, tmp, t0)
            return final
        log.info("checkpoint %s: state copied to host memory in %.1f s; written in the background", name,
                 time.perf_counter() - t0)

        def run():
            try:
                self._write(step, tensors, layout, meta, final, tmp, t0)
            except BaseException as e:  # re-raised by the next save, the export or the end of the run
                self._writer_error = e

        self._writer = threading.Thread(target=run, name=f"checkpoint-{name}", daemon=False)
        self._writer.start()
        return final

    def _write(self, step: int, tensors: dict[str, torch.Tensor], layout: dict[str, Any], meta: dict[str, Any],
               final: Path, tmp: Path, t0: float) -> None:
        """Write this rank's files into `tmp`; rank 0 adds trainer.json once every rank's digests are in,
        renames the folder into place (no partial step-N is ever visible) and drops the oldest."""
        save_file(tensors, str(tmp / f"rank{_rank():05d}.safetensors"))
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
        if self._group is not None:
            dist.barrier(group=self._group)
        else:
            _barrier()

    def _check_free_space(self, my_bytes: int, name: str) -> None:
        """Refuse, before anything is written, a save that would not fit (the previous checkpoint stays)."""
        ok, need, free = ranks_fit(self.dir, my_bytes, self.device)
        if not ok:
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
            if self._group is None and dist.get_backend() == "nccl":
                t = t.to(self.device)
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t, group=self._group)
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


# ---- training checkpoints ------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A `step-N` checkpoint directory from itself or from a run directory (its latest complete one)."""
    return checkpoint_candidates(path)[0]


def checkpoint_candidates(path: str | Path) -> list[Path]:
    """[the checkpoint] for a `step-N` directory; a run directory's complete checkpoints, newest first."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if (p / TRAINER_META).is_file():
        return [p]
    ck = p / "checkpoints"
    if ck.is_dir():
        done = integrity.complete_checkpoints(ck)
        if done:
            return done
        raise ConversionError(f"run directory {p} has no complete checkpoint under {ck}")
    if (p / CONFIG_NAME).is_file():
        raise ConversionError(f"{p} is a model directory, not a training checkpoint")
    if p.name.startswith("step-") or any(p.glob("rank*.safetensors")):
        raise ConversionError(f"checkpoint {p} has no {TRAINER_META}: incomplete (its write was interrupted?)")
    raise ConversionError(f"{p} is neither a run directory (with checkpoints/step-N) nor a checkpoint "
                          f"(with {TRAINER_META})")


@dataclass
class EngineLayout:
    name: str
    kind: str  # "zero3", "torch" or "pipeline"
    zero_world: int
    by_tp: list[list[int]]  # global ranks per tp_rank, in zero-rank order (pipeline: every rank of that tp_rank)
    stages: list[list[int]] | None = None  # pipeline: per tp_rank, one rank per pipeline stage (stage order)


class TrainingCheckpoint:
    """A trainer checkpoint, read offline from its rank files. Construction checks that every rank's files
    are present and readable, and that the ranks cover the tensor-parallel x ZeRO grid."""

    def __init__(self, path: str | Path):
        # every file is checked against the sizes and checksums recorded at save; for a run directory a
        # damaged latest checkpoint gives a warning naming the file and the previous one is used
        damaged = []
        for cand in checkpoint_candidates(path):
            try:
                meta = integrity.verify_checkpoint(cand)
                break
            except CheckpointError as e:
                damaged.append(str(e))
                log.warning("%s; trying the previous checkpoint", e)
        else:
            raise CheckpointError(f"no intact checkpoint in {path}: " + "; ".join(damaged))
        self.path = cand
        self.meta = meta
        if "models" not in meta or "world_size" not in meta:
            raise ConversionError(f"{self.path / TRAINER_META} has no 'models' / 'world_size': written by a trainer "
                                  "that did not record the offline layout; resume it once with the current trainer")
        fp = meta.get("fingerprint", {})
        layout = fp.get("layout") or [meta.get("tp", 1), meta.get("sp", 1), None, 1]
        self.pp = int(layout[3]) if len(layout) > 3 and layout[3] else 1
        self.stage = fp.get("stage")
        self.step = int(meta.get("step", -1))
        self.world = int(meta["world_size"])
        self.tp = int(meta.get("tp", 1))
        self.ranks: list[dict[str, Any]] = []
        self.keys: list[set[str]] = []
        for r in range(self.world):
            j, s = self.rank_json(r), self.rank_file(r)
            for f in (j, s):
                if not f.is_file():
                    raise ConversionError(f"checkpoint {self.path} is missing the shard of rank {r} ({f.name}); "
                                          f"it was written by {self.world} ranks")
            info = read_json(j, "rank layout")
            if int(info.get("rank", -1)) != r or "engines" not in info:
                raise ConversionError(f"{j} does not describe rank {r}")
            self.ranks.append(info)
            self.keys.append(set(safetensors_keys(s)))
        self.layouts = {e: self._engine_layout(e) for e in self.engines}
        self.bar = None  # a progress bar counting the parameter tensors gathered from rank files, when set
        self._counting = False

    # ---- description ----
    def rank_file(self, r: int) -> Path:
        return self.path / f"rank{r:05d}.safetensors"

    def rank_json(self, r: int) -> Path:
        return self.path / f"rank{r:05d}.json"

    @property
    def engines(self) -> list[str]:
        return list(self.meta["models"])

    def _need(self, engine: str) -> None:
        if engine not in self.meta["models"]:
            raise ConversionError(f"checkpoint {self.path} has no model {engine!r}; it holds {self.engines}")

    def config(self, engine: str) -> MMDiTConfig:
        self._need(engine)
        return MMDiTConfig.from_dict(self.meta["models"][engine]["model"])

    def kind(self, engine: str) -> str:
        """Kind of the consolidated model: generator / discriminator (APT), diffusion (flow), consistency (cd)."""
        self._need(engine)
        if engine == "model":
            return "consistency" if self.stage == "cd" else "diffusion"
        default = {"G": "generator", "D": "discriminator"}.get(engine, "diffusion")
        return self.meta["models"][engine].get("kind") or default

    def head_layers(self, engine: str) -> list[int] | None:
        self._need(engine)
        return self.meta["models"][engine].get("head_layers")

    def has_ema(self, engine: str) -> bool:
        return all(f"{engine}.ema.0" in k for k in self.keys)

    def layout_shapes(self, engine: str) -> dict[str, list[int]]:
        """Tensor-parallel local shapes of tp_rank 0 (all its pipeline stages), by parameter name."""
        lay = self.ranks[0]["engines"][engine]
        if lay["kind"] == "zero3":
            return {p[0]: p[1] for g in lay["groups"] for p in g}
        if lay["kind"] == "pipeline":
            return {p[0]: p[1] for r in self.layouts[engine].stages[0] for p in self.ranks[r]["engines"][engine]["params"]}
        return {p[0]: p[1] for p in lay["params"]}

    def head_mlp_ratio(self, engine: str) -> float:
        shapes = self.layout_shapes(engine)
        return head_mlp_ratio_from(shapes, self.config(engine).hidden_size)

    def _pipeline_layout(self, engine: str) -> EngineLayout:
        """Pipeline stages: each (tp_rank, pp_rank) needs at least one rank; data-parallel replicas of it must
        hold identical parameters (checked by --verify)."""
        by: dict[int, dict[int, list[int]]] = {}
        for r, info in enumerate(self.ranks):
            lay = info["engines"].get(engine)
            if lay is None or lay.get("kind") != "pipeline":
                raise ConversionError(f"model {engine!r}: unknown or mixed engine layouts (rank {r} is not 'pipeline')")
            t, s = int(info.get("tp_rank", 0)), int(lay.get("pp_rank", info.get("pp_rank", 0)))
            if not 0 <= t < self.tp or not 0 <= s < self.pp:
                raise ConversionError(f"{self.rank_json(r)}: tp_rank {t} / pp_rank {s} outside tp={self.tp}, pp={self.pp}")
            by.setdefault(t, {}).setdefault(s, []).append(r)
        if sorted(by) != list(range(self.tp)):
            raise ConversionError(f"model {engine!r}: tensor-parallel ranks {sorted(by)} present, expected 0..{self.tp - 1}")
        for t, st in by.items():
            if sorted(st) != list(range(self.pp)):
                raise ConversionError(f"model {engine!r}: tp_rank {t} has pipeline stages {sorted(st)}, expected "
                                      f"0..{self.pp - 1} (missing shard?)")
        stages = [[by[t][s][0] for s in range(self.pp)] for t in range(self.tp)]
        return EngineLayout(engine, "pipeline", 1, [sorted(r for s in by[t].values() for r in s) for t in range(self.tp)],
                            stages)

    def _engine_layout(self, engine: str) -> EngineLayout:
        if any(info["engines"].get(engine, {}).get("kind") == "pipeline" for info in self.ranks):
            return self._pipeline_layout(engine)
        kinds = set()
        by_tp: dict[int, dict[int, int]] = {}
        zero_world = 1
        for r, info in enumerate(self.ranks):
            lay = info["engines"].get(engine)
            if lay is None:
                raise ConversionError(f"{self.rank_json(r)} has no layout for model {engine!r}")
            kinds.add(lay.get("kind"))
            t, z = int(info.get("tp_rank", 0)), int(info.get("zero_rank", 0))
            if not 0 <= t < self.tp:
                raise ConversionError(f"{self.rank_json(r)}: tp_rank {t} is outside 0..{self.tp - 1}")
            if lay.get("kind") == "zero3":
                zero_world = int(lay["zero_world"])
                if z in by_tp.setdefault(t, {}):
                    raise ConversionError(f"ranks {by_tp[t][z]} and {r} both claim tp_rank {t}, zero_rank {z}")
            by_tp.setdefault(t, {}).setdefault(z, r)
        if len(kinds) != 1 or next(iter(kinds)) not in ("zero3", "torch"):
            raise ConversionError(f"model {engine!r}: unknown or mixed engine layouts {sorted(map(str, kinds))}")
        kind = next(iter(kinds))
        if sorted(by_tp) != list(range(self.tp)):
            raise ConversionError(f"model {engine!r}: tensor-parallel ranks {sorted(by_tp)} present, "
                                  f"expected 0..{self.tp - 1}")
        if kind == "zero3":
            for t, zs in by_tp.items():
                if sorted(zs) != list(range(zero_world)):
                    raise ConversionError(f"model {engine!r}: tp_rank {t} has ZeRO ranks {sorted(zs)}, expected "
                                          f"0..{zero_world - 1} (missing shard?)")
        return EngineLayout(engine, kind, zero_world, [[zs[z] for z in sorted(zs)] for t, zs in sorted(by_tp.items())])

    # ---- consolidation ----
    def _tensor(self, r: int, key: str) -> torch.Tensor:
        if key not in self.keys[r]:
            raise ConversionError(f"{self.rank_file(r)} has no tensor {key} (the rank's layout names it)")
        t = read_tensors(self.rank_file(r), [key])[key]
        if self.bar is not None and self._counting:
            self.bar.update(1)
        return t

    def planned_reads(self, engine: str) -> int:
        """How many rank-file tensors gathering `engine`'s parameters reads (tp_local_states; the progress bar's
        total)."""
        lay = self.layouts[engine]
        if lay.kind == "zero3":
            return sum(len(self.ranks[rs[0]]["engines"][engine]["groups"]) * len(rs) for rs in lay.by_tp)
        pre = f"{engine}.param."
        ranks = [r for st in lay.stages for r in st] if lay.kind == "pipeline" else [rs[0] for rs in lay.by_tp]
        total = 0
        for r in ranks:
            named = {p[0] for p in self.ranks[r]["engines"][engine]["params"]}
            total += len(named) + sum(1 for k in self.keys[r] if k.startswith(pre) and k[len(pre):] not in named)
        return total

    def _zero3_local(self, engine: str, t: int, ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        lay = self.layouts[engine]
        ranks = lay.by_tp[t]
        Z = lay.zero_world
        groups = self.ranks[ranks[0]]["engines"][engine]["groups"]
        for r in ranks[1:]:
            other = self.ranks[r]["engines"][engine]["groups"]
            if other != groups:
                raise ConversionError(f"model {engine!r}: rank {r}'s ZeRO layout differs from rank {ranks[0]}'s "
                                      "(mismatched shapes)")
        what = "ema" if ema else "master"
        state, dims = {}, {}
        for gi, group in enumerate(groups):
            want = sum(int(p[2]) for p in group)
            flats = []
            for r in ranks:
                flat = self._tensor(r, f"{engine}.{what}.{gi}")
                if flat.dim() != 1 or flat.numel() != want:
                    raise ConversionError(f"{self.rank_file(r)}: {engine}.{what}.{gi} has shape "
                                          f"{tuple(flat.shape)}, its layout needs ({want},) (mismatched shapes)")
                flats.append(flat)
            off = 0
            for name, shape, pn, dim in group:
                n, pn = numel(shape), int(pn)
                if pn != -(-n // Z):
                    raise ConversionError(f"model {engine!r}: {name} of shape {tuple(shape)} has partition size {pn}, "
                                          f"ZeRO over {Z} ranks gives {-(-n // Z)} (mismatched shapes)")
                full = torch.cat([f[off:off + pn] for f in flats])[:n]
                state[name] = full.view(*shape).clone()
                dims[name] = int(dim)
                off += pn
        return state, dims

    def _pipeline_local(self, engine: str, t: int, ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The union of the stages' parameters (each stage names them as the full model does)."""
        state, dims = {}, {}
        for r in self.layouts[engine].stages[t]:
            s, d = self._torch_local(engine, t, ema, rank=r)
            twice = set(s) & set(state)
            if twice:
                raise ConversionError(f"model {engine!r}: pipeline stages both hold {sorted(twice)[:3]} (overlapping "
                                      "stages)")
            state.update(s)
            dims.update(d)
        return state, dims

    def _torch_local(self, engine: str, t: int, ema: bool, rank: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        r = self.layouts[engine].by_tp[t][0] if rank is None else rank
        params = self.ranks[r]["engines"][engine]["params"]
        pre = f"{engine}.param."
        state, dims = {}, {}
        for j, (name, shape, dim) in enumerate(params):
            v = self._tensor(r, f"{engine}.ema.{j}" if ema else f"{pre}{name}")
            if list(v.shape) != list(shape):
                raise ConversionError(f"{self.rank_file(r)}: {name} has shape {tuple(v.shape)}, its layout says "
                                      f"{tuple(shape)} (mismatched shapes)")
            state[name], dims[name] = v, int(dim)
        named = {p[0] for p in params}
        for k in sorted(self.keys[r]):  # buffers (state_dict entries that are not parameters)
            if k.startswith(pre) and k[len(pre):] not in named:
                state[k[len(pre):]] = self._tensor(r, k)
        return state, dims

    def tp_local_states(self, engine: str, ema: bool = False) -> tuple[list[dict[str, torch.Tensor]], dict[str, int]]:
        """Per tensor-parallel rank, the full (ZeRO-gathered) local parameters; and their partition dims."""
        self._need(engine)
        if ema and not self.has_ema(engine):
            raise ConversionError(f"checkpoint {self.path}: model {engine!r} has no EMA (use the raw weights)")
        fn = {"zero3": self._zero3_local, "pipeline": self._pipeline_local}.get(self.layouts[engine].kind,
                                                                                 self._torch_local)
        locals_, dims = [], {}
        for t in range(self.tp):
            self._counting = True
            try:
                s, d = fn(engine, t, ema)
            finally:
                self._counting = False
            if dims and d != dims:
                raise ConversionError(f"model {engine!r}: tensor-parallel rank {t} lists other parameters than rank 0")
            locals_.append(s)
            dims = d
        return locals_, dims

    def state_dict(self, engine: str, ema: bool = False,
                   buffers: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The consolidated fp32 state dict of an engine's module (keys as the trainer's module names them,
        e.g. `backbone.*` for G and D), checked against the model config. Buffers a ZeRO-3 checkpoint does
        not hold are taken from `buffers` (by MMDiT name, e.g. "pos_table") or recomputed from the config."""
        locals_, dims = self.tp_local_states(engine, ema)
        state = merge_tp_shards(locals_, dims, what=f"checkpoint {self.path} model {engine!r}", check_replicas=False)
        prefix = "backbone." if engine in ("G", "D") or all(k.startswith("backbone.") for k in state) else ""
        r0 = self.layouts[engine].by_tp[0][0]
        for k, v in model_buffers(self.config(engine), prefix).items():
            if k in state:
                continue
            given = (buffers or {}).get(k[len(prefix):])  # an explicit --buffers-from wins over the checkpoint
            if given is None and f"{engine}.buffer.{k}" in self.keys[r0]:  # the trainer saves "{engine}.buffer.{name}"
                state[k] = self._tensor(r0, f"{engine}.buffer.{k}").to(torch.float32)
                continue
            if given is not None and tuple(given.shape) != tuple(v.shape):
                raise ConversionError(f"buffer {k[len(prefix):]} has shape {tuple(given.shape)} where the checkpoint's "
                                      f"model needs {tuple(v.shape)} (mismatched shapes)")
            state[k] = given.to(torch.float32) if given is not None else v
        return state

    def recomputed_buffers(self, engine: str, buffers: dict[str, torch.Tensor] | None = None) -> list[str]:
        """Buffers that consolidation recomputes from the config (not in the checkpoint, not given)."""
        if self.layouts[engine].kind != "zero3":
            return []
        r0 = self.layouts[engine].by_tp[0][0]
        held = {k.split(".buffer.", 1)[1].removeprefix("backbone.") for k in self.keys[r0]
                if k.startswith(f"{engine}.buffer.")}
        return [k for k in model_buffers(self.config(engine)) if k not in (buffers or {}) and k not in held]

    def product_state(self, engine: str, ema: bool = False, state: dict[str, torch.Tensor] | None = None):
        """What a model directory holds: G without its wrapper's `backbone.` prefix, D with every key."""
        state = self.state_dict(engine, ema) if state is None else state
        kind = self.kind(engine)
        if kind != "discriminator" and state and all(k.startswith("backbone.") for k in state):
            state = {k[len("backbone."):]: v for k, v in state.items()}
        check_state(state, expected_shapes(self.config(engine), kind, self.head_layers(engine),
                                           self.head_mlp_ratio(engine)),
                    f"checkpoint {self.path} model {engine!r}")
        return state

    def describe(self) -> str:
        parts = []
        for e in self.engines:
            lay = self.layouts[e]
            zero = f" over {lay.zero_world} ZeRO ranks" if lay.kind == "zero3" else ""
            parts.append(f"{e} ({self.kind(e)}, {lay.kind}{zero}" + (", +EMA" if self.has_ema(e) else "") + ")")
        return (f"checkpoint {self.path} (stage {self.stage}, step {self.step}, {self.world} ranks, tp {self.tp}, pp {self.pp}): "
                + ", ".join(parts))

    # ---- verification ----
    def check_against_rank_files(self, engine: str, ema: bool, state: dict[str, torch.Tensor]) -> int:
        """Split a consolidated state (keys as `state_dict` returns them) again into every rank's tensors and
        compare with the rank files bit for bit (padding excluded). Returns the number of rank tensors checked."""
        checked = 0
        lay = self.layouts[engine]
        what = "ema" if ema else "master"
        for t, ranks in enumerate(lay.by_tp):
            for z, r in enumerate(ranks):
                rl = self.ranks[r]["engines"][engine]
                if lay.kind == "zero3":
                    for gi, group in enumerate(rl["groups"]):
                        flat = self._tensor(r, f"{engine}.{what}.{gi}")
                        off = 0
                        for name, shape, pn, dim in group:
                            full = state[name]
                            local = full.chunk(self.tp, dim=dim)[t] if dim >= 0 and self.tp > 1 else full
                            vals = local.reshape(-1)
                            start = z * pn
                            n = max(0, min(vals.numel() - start, pn))
                            if not torch.equal(flat[off:off + n], vals[start:start + n]):
                                raise VerificationError(f"{name}: the consolidated tensor does not reproduce rank "
                                                        f"{r}'s partition (tp_rank {t}, zero_rank {z})")
                            off += pn
                        checked += 1
                else:
                    for j, (name, shape, dim) in enumerate(rl["params"]):
                        v = self._tensor(r, f"{engine}.ema.{j}" if ema else f"{engine}.param.{name}")
                        full = state[name]
                        local = full.chunk(self.tp, dim=dim)[t] if dim >= 0 and self.tp > 1 else full
                        if not torch.equal(v, local):
                            raise VerificationError(f"{name}: the consolidated tensor does not reproduce rank {r}'s "
                                                    f"copy (tp_rank {t}; data-parallel replicas must be identical)")
                        checked += 1
        return checked
