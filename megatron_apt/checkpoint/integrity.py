"""Checkpoint integrity: every file of a training checkpoint has its size and checksum recorded at save time
(in `trainer.json`, under "files"), and both are checked before the checkpoint is used.

The checksum is xxHash's XXH3-64 (several GB/s per core, so hashing a shard right after writing it, while
it is still in the page cache, costs little next to the write). A flipped bit, a truncated file, a garbled
safetensors header or a missing shard are all reported as `CheckpointError`, naming the file: the trainer
then falls back to the previous complete checkpoint, the offline tools refuse the checkpoint.

Names read from `trainer.json` (model names, file names) are checked to be plain names before they are
joined to any path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import xxhash

from megatron_apt.utils import check_plain_name

ALGORITHM = "xxh3_64"
CHUNK = 16 << 20
TRAINER_META = "trainer.json"
STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, or holding unsafe names); one-line message."""


def file_digest(path: str | Path) -> tuple[int, int]:
    """(size in bytes, XXH3-64 as an unsigned int) of a file, read in chunks."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return size, h.intdigest()


def digest_record(size: int, digest: int) -> dict[str, Any]:
    return {"size": int(size), ALGORITHM: f"{int(digest) & (2**64 - 1):016x}"}


def to_int64(digest: int) -> int:
    """An unsigned 64-bit digest as a signed int64 (to travel in a torch.int64 tensor); `from_int64` undoes it."""
    return digest - 2**64 if digest >= 2**63 else digest


def from_int64(value: int) -> int:
    return value & (2**64 - 1)


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """The `step-N` folders holding a trainer.json, newest first (interrupted `.step-N.partial` folders and
    folders set aside as `step-N.damaged` are not candidates)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_DIR.fullmatch(p.name) and (p / TRAINER_META).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)), reverse=True)


def step_dirs(ckpt_dir: str | Path) -> list[Path]:
    """Every `step-N` folder (complete or not), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def read_trainer_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer.json, checked: a JSON object with an int step, the world size, plain model
    names and (when recorded) a plain-named file table."""
    f = Path(path) / TRAINER_META
    try:
        meta = json.loads(f.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{f} is missing") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({' '.join(str(e).split())}): damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f} does not hold a JSON object: damaged")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{f} has no valid 'step' (got {step!r}): damaged")
    world = meta.get("world_size", 1)
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise CheckpointError(f"{f} has no valid 'world_size' (got {world!r}): damaged")
    models = meta.get("models", {})
    if not isinstance(models, dict):
        raise CheckpointError(f"{f}: 'models' is not a mapping: damaged")
    try:
        for name in models:
            check_plain_name(name, f"{f}: model name")
        for name in meta.get("files") or {}:
            check_plain_name(name, f"{f}: file name")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    files = meta.get("files")
    if files is not None and (not isinstance(files, dict)
                              or not all(isinstance(v, dict) and "size" in v and ALGORITHM in v for v in files.values())):
        raise CheckpointError(f"{f}: 'files' is not a table of sizes and {ALGORITHM} checksums: damaged")
    return meta


def rank_files(rank: int) -> list[str]:
    """The files one rank writes into a checkpoint."""
    return [f"rank{rank:05d}.safetensors", f"rank{rank:05d}.json"]


def verify_files(path: str | Path, meta: dict[str, Any], names: list[str]) -> None:
    """Check the named files of a checkpoint against the sizes and checksums its trainer.json records.
    A checkpoint written before checksums were recorded only needs the files to exist."""
    path = Path(path)
    table = meta.get("files")
    for name in names:
        check_plain_name(name, "checkpoint file name")
        f = path / name
        if not f.is_file():
            m = re.fullmatch(r"rank(\d+)\..*", name)
            what = f"the shard of rank {int(m.group(1))} ({name})" if m else name
            raise CheckpointError(f"checkpoint {path} is missing {what}; it was written by {meta.get('world_size')} "
                                  "ranks")
        if table is None:
            continue
        want = table.get(name)
        if want is None:
            raise CheckpointError(f"{f} is not listed in {path / TRAINER_META}'s checksums: damaged")
        size, digest = file_digest(f)
        if size != int(want["size"]):
            raise CheckpointError(f"{f} has {size} bytes where {want['size']} were written: truncated or damaged")
        have = digest_record(size, digest)[ALGORITHM]
        if have != want[ALGORITHM]:
            raise CheckpointError(f"{f} does not match its recorded checksum ({ALGORITHM} {have}, written "
                                  f"{want[ALGORITHM]}): damaged")


def verify_checkpoint(path: str | Path, ranks: list[int] | None = None) -> dict[str, Any]:
    """Read and check trainer.json, then the files of `ranks` (default: every rank). Returns the metadata."""
    meta = read_trainer_meta(path)
    ranks = list(range(meta.get("world_size", 1))) if ranks is None else ranks
    verify_files(path, meta, [n for r in ranks for n in rank_files(r)])
    return meta
