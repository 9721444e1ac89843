"""Small shared helpers: atomic file and directory writes, logging setup, progress bars."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator


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
