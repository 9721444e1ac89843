"""Small shared helpers: atomic file and directory writes, logging setup, progress bars, strict JSON,
command-line errors, per-sample seeds."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import re
import sys
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


PACKAGE_LOGGER = "megatron_apt"
_THIRD_PARTY_LOGGERS = ("DeepSpeed",)  # libraries that log on every rank


def _env_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", "0") or 0)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on", "all")


class _TqdmStderrHandler(logging.Handler):
    """Writes records to the current sys.stderr (not the one of its creation time) through tqdm.write, so that
    log lines print above an active progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _BelowWarningOnOtherRanks(logging.Filter):
    """Drops a third-party library's INFO/DEBUG records on ranks other than 0 (unless all ranks may log)."""

    def __init__(self):
        super().__init__()
        self.quiet = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.quiet and record.levelno < logging.WARNING)


_rank_filter = _BelowWarningOnOtherRanks()


def setup_logging(rank: int | None = None, all_ranks: bool | None = None) -> logging.Logger:
    """Configure the package logger ("megatron_apt"): INFO on rank 0, WARNING on the other ranks unless
    `all_ranks` (or MEGATRON_APT_LOG_ALL_RANKS=1); MEGATRON_APT_LOGLEVEL sets rank 0's level. Lines carry the
    rank when there are several. DeepSpeed's own INFO lines follow the same rule. Called again (e.g. once
    torch.distributed knows the rank) it updates the levels; an application that configured the root logger
    itself keeps its handlers (records propagate there)."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    rank = _env_rank() if rank is None else rank
    if all_ranks is None:
        all_ranks = _truthy(os.environ.get("MEGATRON_APT_LOG_ALL_RANKS"))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    base = logging.getLevelName(os.environ.get("MEGATRON_APT_LOGLEVEL", "INFO").upper())
    base = base if isinstance(base, int) else logging.INFO
    logger.setLevel(base if rank == 0 or all_ranks else max(base, logging.WARNING))
    handler = next((h for h in logger.handlers if isinstance(h, _TqdmStderrHandler)), None)
    if handler is None and not logging.getLogger().handlers:
        handler = _TqdmStderrHandler()
        logger.addHandler(handler)
        logger.propagate = False
    if handler is not None:
        tag = f" rank {rank}" if world > 1 or rank > 0 else ""
        handler.setFormatter(logging.Formatter(f"[%(asctime)s{tag} %(name)s] %(message)s", "%H:%M:%S"))
    _rank_filter.quiet = rank != 0 and not all_ranks
    for name in _THIRD_PARTY_LOGGERS:
        lg = logging.getLogger(name)
        if _rank_filter not in lg.filters:
            lg.addFilter(_rank_filter)
    return logger


def get_logger(name: str) -> logging.Logger:
    """A logger under the package logger (configured by setup_logging on first use)."""
    pkg = logging.getLogger(PACKAGE_LOGGER)
    if not pkg.handlers and pkg.level == logging.NOTSET:
        setup_logging()
    return logging.getLogger(name)


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it",
             enabled: bool | None = None, **kwargs):
    """A tqdm progress bar on rank 0 for long work. Shown where stderr is a terminal; MEGATRON_APT_PROGRESS=1
    shows it anywhere (e.g. in a batch job's log), =0 nowhere. Other ranks never show one."""
    from tqdm import tqdm

    if enabled is None:
        env = os.environ.get("MEGATRON_APT_PROGRESS", "").strip().lower()
        enabled = env in ("1", "true", "yes", "on") or (env not in ("0", "false", "no", "off")
                                                       and sys.stderr.isatty())
    enabled = enabled and _env_rank() == 0
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, **kwargs)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Write a file through a temporary sibling and rename it into place only on success.

    A crash or exception leaves either the old file or nothing, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


FREE_SPACE_MARGIN = 1.05  # bytes to write x this (+ 64 MiB) must be free before a large write starts


class NotEnoughSpaceError(OSError):
    """A write refused before it began: the filesystem lacks the room (nothing was written or removed)."""


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def bytes_needed(nbytes: int) -> int:
    """The free space a write of `nbytes` asks for: the margin covers metadata and filesystem slack."""
    return int(nbytes * FREE_SPACE_MARGIN) + (64 << 20)


def check_free_space(path: str | os.PathLike, nbytes: int, what: str) -> None:
    """Raise NotEnoughSpaceError, before anything is written, when `nbytes` would not fit under `path`."""
    need, free = bytes_needed(nbytes), free_bytes(path)
    if free < need:
        raise NotEnoughSpaceError(
            f"not enough free space for {what} in {path}: it needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB "
            "are free; nothing was written")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only when the block succeeds.

    Readers never see a partially written directory: either the final name does not exist, or it holds
    everything the block wrote. With ``overwrite`` an existing directory is replaced only after the new
    one is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output path {path} already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sample_seed(seed: int, step: int, purpose: str, position: int) -> int:
    """A 63-bit seed of (seed, step, purpose, position): per-sample randomness and data order."""
    import hashlib

    h = hashlib.blake2b(f"{seed}/{step}/{purpose}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ---- strict JSON ---------------------------------------------------------------------------------------
def json_safe(rec: dict[str, Any]) -> dict[str, Any]:
    """A flat record that strict JSON parsers accept: non-finite floats become null and their keys are listed
    under "nonfinite" (JSON has no NaN or Infinity; Python's json module would write them bare)."""
    out, bad = {}, []
    for k, v in rec.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
            bad.append(k)
        else:
            out[k] = v
    if bad:
        out["nonfinite"] = sorted(set(bad) | set(rec.get("nonfinite") or []))
    return out


def strict_dumps(obj: Any, **kw: Any) -> str:
    """json.dumps that refuses NaN / Infinity instead of writing invalid JSON."""
    return json.dumps(obj, allow_nan=False, **kw)


# ---- names read from files -----------------------------------------------------------------------------
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_plain_name(name: Any, what: str) -> str:
    """A name read from a file (a checkpoint's model names, a manifest's field names) that will become part
    of a path: one plain component (letters, digits, _ . -; no separator, no '..'), else ValueError."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or set(name) == {"."}:
        raise ValueError(f"{what} {name!r} is not a plain name (letters, digits, '_', '.', '-'); refusing to use "
                         "it in a path")
    return name


# ---- command-line boundary -----------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit status 2) instead of the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def os_error_message(e: OSError) -> str:
    """One line naming the path(s) and the cause of an OSError."""
    if e.filename is not None:
        path = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{path}: {e.strerror or e.__class__.__name__}"
    return " ".join(str(e).split()) or e.__class__.__name__


def cli_main(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a tool's main(): an OSError (permission denied, a missing folder, a full disk) becomes one line
    `error: PATH: cause` on stderr and exit status 2 instead of a traceback. Writes are atomic, so a failed
    one leaves nothing half-written behind."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except OSError as e:
            print(f"error: {os_error_message(e)}", file=sys.stderr, flush=True)
            return 2

    return wrapped
