"""Preprocess videos and images into the indexed data set format of :mod:`megatron_apt.data.indexed`.

Pipeline, per rank
------------------
1. List the inputs (folder / CSV / JSONL, see :func:`megatron_apt.data.media.list_inputs`); input
   ``i`` belongs to rank ``i % world_size``.
2. The rank's inputs are cut into *parts* of ``--part-size`` inputs. Decode workers (processes)
   turn inputs into clips; the main process encodes them (VAE latents or raw pixels, text hidden
   states or token ids) and writes each part as a small complete data set inside a directory that
   is renamed into place only when the part is finished (``PREFIX_rankK_of_N.parts/part_000012``).
   A progress file records the finished parts.
3. After a kill, a restart with the same arguments deletes unfinished part directories, skips
   finished parts and carries on: no sample is lost or written twice. The settings are recorded
   with the parts and a restart with different settings is refused.
4. When all parts are done they are concatenated (Megatron's ``add_index``) into the rank's shard
   ``PREFIX_rankK_of_N`` (just ``PREFIX`` when there is one rank).
5. ``--merge`` concatenates the shards of all ranks into ``PREFIX``.

Sample order
------------
Within a shard, samples follow the input order (then the clip order within a video). A merged
data set holds rank 0's shard, then rank 1's, and so on; so with several ranks the order is
"rank-major" and differs from a one-rank run, while the set of samples and every sample's bytes
are the same. Each sample's metadata records ``input_index`` and ``clip`` to recover the input
order.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from megatron_apt.data import indexed
from megatron_apt.data.media import (
    ClipSpec,
    DecodeResult,
    InputError,
    InputItem,
    decode_item,
    decode_worker_init,
    inputs_fingerprint,
    list_inputs,
    parse_fps,
    parse_resolution,
)
from megatron_apt.utils import atomic_directory, atomic_write_json, cli_main, get_logger

logger = get_logger("megatron_apt.preprocess")

# Test hooks: simulate a crash after this many samples have been written by this process.
KILL_AFTER_ENV = "MEGATRON_APT_PREPROCESS_KILL_AFTER"  # SIGKILL (nothing gets cleaned up)
RAISE_AFTER_ENV = "MEGATRON_APT_PREPROCESS_RAISE_AFTER"  # an exception (cleanup handlers run)


class PreprocessError(RuntimeError):
    """A problem with the arguments or the existing output that stops the job before it starts."""


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class PreprocessStats:
    inputs: int = 0
    clips: int = 0
    rejects: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0  # summed over decode workers
    encode_seconds: float = 0.0
    parts_done: int = 0
    parts_skipped: int = 0
    output: str = ""

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_second_in(self) -> float:
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_second_out(self) -> float:
        return self.bytes_out / 1e6 / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Cut videos/images into fixed-size clips, optionally encode them (VAE latents, text "
        "hidden states) and write Megatron indexed data sets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("input/output")
    io.add_argument("--input",
                    help="folder of NAME.mp4/.png + NAME.txt, a CSV (path,caption) or a JSONL (path, caption)")
    io.add_argument("--output", required=True,
                    help="output prefix PREFIX (writes PREFIX.json, PREFIX_latents.bin, ...)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing output/partial output")
    io.add_argument("--keep-parts", action="store_true", help="keep the per-part directories after the shard is built")

    clip = p.add_argument_group("clips")
    clip.add_argument("--resolution", help="target WIDTHxHEIGHT, e.g. 1280x720 (resize to cover + centre crop)")
    clip.add_argument("--fps", default="24", help="target frame rate (nearest source frame per target timestamp)")
    g = clip.add_mutually_exclusive_group()
    g.add_argument("--seconds", type=float, default=None,
                   help="clip length in seconds (default 2); with a temporal VAE rounded down to 1 + r*k frames")
    g.add_argument("--frames", type=int, default=None, help="clip length in frames (must suit the VAE: 1 + r*k)")
    clip.add_argument("--clips-per-video", type=int, default=1,
                      help="at most this many clips per video, spread over it")

    enc = p.add_argument_group("encoding")
    enc.add_argument("--vae", default="none", help="diffusers VAE directory (AutoencoderKLWan/AutoencoderKL) or 'none' "
                     "to store uint8 pixels")
    enc.add_argument("--vae-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="VAE compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    enc.add_argument("--latent-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                     help="dtype latents are stored in")
    enc.add_argument("--vae-tiling", action="store_true", help="encode with diffusers' spatial tiling (less memory)")
    enc.add_argument("--text-encoder", default="none", help="T5/UMT5 encoder directory or 'none' to store token ids")
    enc.add_argument("--text-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="text encoder compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    enc.add_argument("--tokenizer", default=None, help="with --text-encoder none: tokenizer directory for token ids "
                     "(default: byte-level ids, UTF-8 byte + 1, 0 = pad)")
    enc.add_argument("--max-text-len", type=int, default=512, help="captions are truncated to this many tokens")
    enc.add_argument("--batch-size", type=int, default=1, help="clips per VAE forward pass")
    enc.add_argument("--text-batch-size", type=int, default=64, help="captions per text-encoder forward pass")
    enc.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (cuda uses LOCAL_RANK under torchrun)")
    enc.add_argument("--torch-threads", type=int, default=0,
                     help="torch intra-op threads for encoding on CPU (0: torch's default); 1 is often fastest on a "
                     "busy machine or with several ranks per node")

    par = p.add_argument_group("scale")
    par.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)")
    par.add_argument("--world-size", type=int, default=None, help="number of ranks (default: $WORLD_SIZE or 1)")
    par.add_argument("--workers", type=int, default=None,
                     help="decode worker processes (0: decode in the main process; default: CPUs per local rank - 1)")
    par.add_argument("--part-size", type=int, default=256, help="inputs per resumable part")
    par.add_argument("--merge", action="store_true", help="merge the rank shards PREFIX_rankK_of_N into PREFIX (alone, "
                     "or after processing on rank 0, which then waits for the other ranks)")
    par.add_argument("--merge-timeout", type=float, default=24 * 3600.0,
                     help="seconds rank 0 waits for the other ranks' shards before merging")
    par.add_argument("--verify", action="store_true", help="re-read the output and check it; alone: verify PREFIX")
    par.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@dataclass
class Settings:
    """Everything that determines the bytes of the output (recorded in manifests and part dirs)."""

    width: int
    height: int
    fps: str
    frames: int
    clips_per_video: int
    media: str  # "latents" | "pixels"
    latent_dtype: str | None
    vae: dict[str, Any] | None
    text_kind: str  # "hidden" | "ids"
    text_encoder: dict[str, Any] | None
    tokenizer: dict[str, Any] | None
    max_text_len: int
    input: str
    input_fingerprint: str
    num_inputs: int
    world_size: int
    part_size: int

    def fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        # Where the inputs live does not change the data (the input list is in input_fingerprint),
        # and shards made on nodes with different mount points must still merge.
        d.pop("input")
        # Paths of encoders do not change the data; their identity is in the rest of the entry.
        for k in ("vae", "text_encoder", "tokenizer"):
            if d[k]:
                d[k] = {kk: vv for kk, vv in d[k].items() if kk != "path"}
        return d


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PreprocessError(f"--device {name}: CUDA is not available on this machine")
    return dev


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _TORCH_DTYPES[name]


def shard_prefix(prefix: str, rank: int, world_size: int) -> str:
    return prefix if world_size == 1 else f"{prefix}_rank{rank}_of_{world_size}"


def _part_name(p: int) -> str:
    return f"part_{p:06d}"


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "numpy", "av", "Pillow", "diffusers", "transformers", "megatron-core", "sentencepiece"):
        with contextlib.suppress(Exception):
            out[pkg] = metadata.version(pkg)
    import megatron_apt

    out["megatron_apt"] = megatron_apt.__version__
    return out


# ----------------------------------------------------------------------------------------------
# Decoding, in worker processes
# ----------------------------------------------------------------------------------------------


def _iter_decoded(items: Sequence[InputItem], spec: ClipSpec, workers: int, window: int) -> Iterator[DecodeResult]:
    """Decode ``items`` in order, with up to ``window`` inputs in flight over ``workers`` processes.

    A decoder that crashes its process (a segfault in a codec) costs only that input: the pool is
    rebuilt and the inputs that were in flight are retried one by one, and the one that breaks a
    pool again is rejected.
    """
    if workers <= 0:
        for it in items:
            yield decode_item(it, spec)
        return

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # forkserver: workers do not inherit CUDA state or the main process's threads.
    ctx = mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=decode_worker_init)

    pool = new_pool()
    pending: deque = deque()
    source = iter(items)

    def fill() -> None:
        while len(pending) < window:
            try:
                it = next(source)
            except StopIteration:
                return
            pending.append((it, pool.submit(decode_item, it, spec)))

    try:
        fill()
        while pending:
            it, fut = pending.popleft()
            try:
                res = fut.result()
            except BrokenProcessPool:
                retry = [it] + [i for i, _ in pending]
                pending.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
                for r in retry:
                    try:
                        yield pool.submit(decode_item, r, spec).result()
                    except BrokenProcessPool:
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = new_pool()
                        bad = DecodeResult(item=r, caption=None)
                        yield bad.reject("the decoder process crashed on this file")
                fill()
                continue
            yield res
            fill()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


class Encoders:
    """Turns decoded clips + captions into what is stored (latents or pixels, hidden states or ids)."""

    def __init__(self, settings: Settings, args: argparse.Namespace, device: torch.device):
        self.settings = settings
        self.device = device
        self.vae = None
        self.text_encoder = None
        self.tokenizer = None
        if settings.vae is not None:
            from megatron_apt.models.vae import load_vae

            self.vae = load_vae(args.vae, device=device, dtype=_dtype(args.vae_dtype, device))
        if settings.text_encoder is not None:
            from megatron_apt.models.text_encoder import load_text_encoder

            self.text_encoder = load_text_encoder(args.text_encoder, device=device,
                                                  dtype=_dtype(args.text_dtype, device))
        elif args.tokenizer:
            from megatron_apt.models.text_encoder import load_tokenizer

            self.tokenizer = load_tokenizer(args.tokenizer)
        else:
            from megatron_apt.models.text_encoder import ByteTokenizer

            self.tokenizer = ByteTokenizer()
        self.tile = bool(getattr(args, "vae_tiling", False))
        self.text_batch = max(1, int(args.text_batch_size))

    def media(self, clips: list[np.ndarray]) -> list[torch.Tensor | np.ndarray]:
        """Clips (all of one shape) -> what is stored for each."""
        if self.vae is None:
            return clips
        x = torch.from_numpy(np.stack(clips)).to(self.device, non_blocking=True)
        x = x.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0).contiguous()  # [B, 3, T, H, W] in [-1, 1]
        z = self.vae.encode(x, tile=self.tile)
        z = z.to(_TORCH_DTYPES[self.settings.latent_dtype]).cpu()
        return [z[i] for i in range(z.shape[0])]

    def text(self, captions: list[str]) -> list[tuple[torch.Tensor | np.ndarray, bool]]:
        """Captions -> (hidden [L, D] bf16 or ids [L] int32, truncated?) each.

        Called with the captions of one VAE batch, split into forward passes of ``--text-batch-size``.
        """
        max_len = self.settings.max_text_len
        out: list[tuple[Any, bool]] = []
        if self.text_encoder is not None:
            for i in range(0, len(captions), self.text_batch):
                chunk = captions[i : i + self.text_batch]
                hidden, mask = self.text_encoder.encode(chunk, max_length=max_len)
                hidden = hidden.to(torch.bfloat16).cpu()
                lengths = mask.sum(1).tolist()
                for j, n in enumerate(lengths):
                    out.append((hidden[j, :n].clone(), self._truncated(chunk[j], n)))
            return out
        for c in captions:
            ids = self.tokenizer.encode(c, max_len)
            out.append((np.asarray(ids, dtype=np.int32), self._truncated(c, len(ids))))
        return out

    def _truncated(self, caption: str, n: int) -> bool:
        if n < self.settings.max_text_len:
            return False
        tok = self.text_encoder.tokenizer if self.text_encoder is not None else self.tokenizer
        return len(tok.encode(caption)) > self.settings.max_text_len

    def describe(self) -> dict[str, Any]:
        return {
            "vae": self.vae.info.describe() if self.vae else None,
            "text_encoder": self.text_encoder.describe() if self.text_encoder else None,
            "tokenizer": self.tokenizer.describe() if self.tokenizer else None,
        }


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def _sample_meta(res: DecodeResult, clip: Any, settings: Settings, truncated: bool) -> dict[str, Any]:
    item = res.item
    meta = {
        "caption": res.caption,
        "source": item.source,
        "input_index": item.index,
        "clip": clip.clip_index,
        "start": round(clip.start, 6),
        "kind": item.kind,
        "frames": int(clip.frames.shape[0]),
        "fps": float(Fraction(settings.fps)) if item.kind == "video" else None,
        "source_size": res.info.get("source_size"),
        "source_fps": res.info.get("source_fps"),
    }
    if truncated:
        meta["text_truncated"] = True
    if item.extra:
        meta["extra"] = item.extra
    return meta


def _reject_record(res: DecodeResult, rej: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": res.item.source,
        "path": res.item.path,
        "input_index": res.item.index,
        "clip": rej.get("clip"),
        "reason": rej["reason"],
    }


class _CrashHook:
    """Test hook: simulate being killed after N samples (see KILL_AFTER_ENV / RAISE_AFTER_ENV)."""

    def __init__(self) -> None:
        self.kill_after = _env_int(KILL_AFTER_ENV, -1)
        self.raise_after = _env_int(RAISE_AFTER_ENV, -1)
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.count == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.count == self.raise_after:
            raise RuntimeError(f"simulated crash after {self.count} samples ({RAISE_AFTER_ENV})")


class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.bar = None
        self.t0 = time.perf_counter()
        self.clips = 0
        self.bytes_in = 0
        self.bytes_out = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="input", dynamic_ncols=True, mininterval=1.0,
                            smoothing=0.05, file=sys.stderr)

    def update(self, inputs: int, clips: int, bytes_in: int, bytes_out: int) -> None:
        self.clips += clips
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(
                f"{self.clips / dt:.1f} clips/s, {self.bytes_in / 1e6 / dt:.1f} MB/s in, "
                f"{self.bytes_out / 1e6 / dt:.1f} MB/s out",
                refresh=False,
            )
            self.bar.update(inputs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _validate(args: argparse.Namespace) -> None:
    if args.input is not None and not os.path.exists(args.input):
        raise PreprocessError(f"--input {args.input!r} does not exist")
    if args.input is not None and not args.resolution:
        raise PreprocessError("--resolution is required with --input (e.g. --resolution 1280x720)")
    if args.frames is not None and args.frames < 1:
        raise PreprocessError(f"--frames must be >= 1, got {args.frames}")
    if args.seconds is not None and args.seconds <= 0:
        raise PreprocessError(f"--seconds must be > 0, got {args.seconds}")
    if args.clips_per_video < 1:
        raise PreprocessError(f"--clips-per-video must be >= 1, got {args.clips_per_video}")
    if args.max_text_len < 1:
        raise PreprocessError(f"--max-text-len must be >= 1, got {args.max_text_len}")
    if args.batch_size < 1 or args.part_size < 1:
        raise PreprocessError("--batch-size and --part-size must be >= 1")
    for flag in ("vae", "text_encoder"):
        v = getattr(args, flag)
        if v.lower() != "none" and not os.path.isdir(v):
            raise PreprocessError(
                f"--{flag.replace('_', '-')} {v!r} is not a directory (give a local model folder or 'none')"
            )
    if args.tokenizer and args.text_encoder.lower() != "none":
        raise PreprocessError(
            "--tokenizer is only used with --text-encoder none (the encoder brings its own tokenizer)"
        )
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        raise PreprocessError(f"--tokenizer {args.tokenizer!r} is not a directory")
    if args.output.endswith(os.sep) or os.path.isdir(args.output):
        raise PreprocessError(
            f"--output {args.output!r} is a directory; give a file prefix such as {args.output.rstrip(os.sep)}/train"
        )


def make_settings(args: argparse.Namespace, items: Sequence[InputItem], world_size: int) -> Settings:
    width, height = parse_resolution(args.resolution)
    fps = parse_fps(args.fps)
    vae_info = None
    if args.vae.lower() != "none":
        from megatron_apt.models.vae import read_vae_info

        vae_info = read_vae_info(args.vae)
        s = vae_info.spatial_compression
        if width % s or height % s:
            raise PreprocessError(
                f"--resolution {width}x{height} is not a multiple of the VAE's spatial compression {s}"
            )
    if args.frames is not None:
        frames = int(args.frames)
        if vae_info is not None and not vae_info.valid_frames(frames):
            r = vae_info.temporal_compression
            lo = 1 + r * ((frames - 1) // r)
            raise PreprocessError(
                f"--frames {frames} does not suit {vae_info.class_name} (needs 1 + {r}k frames, e.g. {lo} or {lo + r})"
            )
    else:
        seconds = 2.0 if args.seconds is None else float(args.seconds)
        frames = max(1, math.floor(Fraction(str(seconds)) * fps))
        if vae_info is not None and vae_info.temporal_compression > 1:
            r = vae_info.temporal_compression
            frames = 1 + r * ((frames - 1) // r)  # round down: a clip never needs more than --seconds of video
    text_info = tok_info = None
    if args.text_encoder.lower() != "none":
        from megatron_apt.models.text_encoder import read_text_encoder_info

        text_info = read_text_encoder_info(args.text_encoder)
    elif args.tokenizer:
        tok_info = {"name": "tokenizer", "path": os.path.abspath(args.tokenizer)}
    else:
        tok_info = {"name": "byte", "vocab_size": 257, "pad_id": 0}
    return Settings(
        width=width,
        height=height,
        fps=str(fps),
        frames=frames,
        clips_per_video=int(args.clips_per_video),
        media="latents" if vae_info else "pixels",
        latent_dtype=args.latent_dtype if vae_info else None,
        vae=vae_info.describe() if vae_info else None,
        text_kind="hidden" if text_info else "ids",
        text_encoder=text_info,
        tokenizer=tok_info,
        max_text_len=int(args.max_text_len),
        input=os.path.abspath(args.input),
        input_fingerprint=inputs_fingerprint(items),
        num_inputs=len(items),
        world_size=world_size,
        part_size=int(args.part_size),
    )


def _default_workers() -> int:
    local_world = max(1, _env_int("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, (os.cpu_count() or 1) // local_world - 1))


def _prepare_parts_dir(parts_dir: Path, settings: Settings, overwrite: bool) -> None:
    config_path = parts_dir / "settings.json"
    want = settings.fingerprint()
    if parts_dir.exists() and overwrite:
        shutil.rmtree(parts_dir)
    if parts_dir.exists():
        try:
            with open(config_path) as f:
                have = json.load(f)
        except (FileNotFoundError, ValueError):
            have = None
        if have != want:
            diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
            raise PreprocessError(
                f"{parts_dir} holds a partial run made with different settings "
                f"(differs in: {', '.join(diff) or 'unknown'}); "
                "rerun with the original arguments to resume, or pass --overwrite to start again"
            )
        # Unfinished parts of a killed run: atomic_directory's temporaries, and writer temporaries.
        for stale in parts_dir.glob(".part_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    else:
        parts_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config_path, want)


def _write_part(
    part_dir: Path,
    results: Iterable[DecodeResult],
    encoders: Encoders,
    settings: Settings,
    fields: dict[str, Any],
    batch_size: int,
    hook: _CrashHook,
    progress: _Progress,
    stats: PreprocessStats,
) -> dict[str, Any]:
    """Encode and write one part's inputs as a small complete data set at ``part_dir/data``."""
    writer = indexed.DatasetWriter(part_dir / "data", fields)
    with writer:
        pending: list[tuple[DecodeResult, Any]] = []

        def flush() -> None:
            if not pending:
                return
            t0 = time.perf_counter()
            media = encoders.media([c.frames for _, c in pending])
            texts = encoders.text([r.caption for r, _ in pending])
            stats.encode_seconds += time.perf_counter() - t0
            for (res, clip), m, (txt, trunc) in zip(pending, media, texts):
                writer.add(m, txt, _sample_meta(res, clip, settings, trunc))
                hook.tick()
            pending.clear()

        for res in results:
            stats.decode_seconds += res.seconds
            for rej in res.rejects:
                writer.add_reject(_reject_record(res, rej))
            for clip in res.clips:
                if pending and (len(pending) >= batch_size or pending[0][1].frames.shape != clip.frames.shape):
                    flush()
                pending.append((res, clip))
            if len(pending) >= batch_size:
                flush()
            progress.update(1, len(res.clips), res.bytes_read, 0)
            stats.inputs += 1
            stats.bytes_in += res.bytes_read
        flush()
        manifest = writer.commit({"settings": settings.fingerprint()})
    stats.clips += manifest["num_samples"]
    stats.rejects += manifest["num_rejects"]
    stats.bytes_out += manifest["nbytes"]
    progress.update(0, 0, 0, manifest["nbytes"])
    return manifest


def process(args: argparse.Namespace) -> PreprocessStats:
    """Run the rank's share of the job (and the merge/verify steps asked for). Returns statistics."""
    t_start = time.perf_counter()
    stats = PreprocessStats()
    rank = args.rank if args.rank is not None else _env_int("RANK", 0)
    world = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise PreprocessError(f"bad rank/world size: rank {rank}, world size {world} (need 0 <= rank < world size)")
    _validate(args)
    prefix = args.output
    if args.input is None:
        # Stand-alone steps.
        if not (args.merge or args.verify):
            raise PreprocessError("nothing to do: give --input (to preprocess), --merge or --verify")
        if args.merge:
            merge_shards(prefix, overwrite=args.overwrite)
        if args.verify:
            _print_verify(prefix)
        stats.output = prefix
        return stats

    items = list_inputs(args.input)
    settings = make_settings(args, items, world)
    shard = shard_prefix(prefix, rank, world)
    stats.output = shard
    parts_dir = Path(f"{shard}.parts")
    progress_path = Path(f"{shard}.progress.json")
    if args.overwrite:
        indexed.remove_dataset(shard)
        if parts_dir.exists():
            shutil.rmtree(parts_dir)
    if indexed.is_complete(shard):
        have = indexed.read_manifest(shard).get("settings")
        if have != settings.fingerprint():
            raise PreprocessError(
                f"{shard} already exists and was made with different settings; pass --overwrite to replace it"
            )
        logger.info("%s is already complete; nothing to preprocess", shard)
        if parts_dir.exists() and not args.keep_parts:  # a run killed after building the shard left its parts
            shutil.rmtree(parts_dir, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                progress_path.unlink()
            logger.info("removed %s, left by a run that finished its shard", parts_dir)
    else:
        _run_parts(args, items, settings, rank, world, shard, parts_dir, progress_path, stats)
    stats.seconds = time.perf_counter() - t_start
    final = shard
    if world > 1 and args.merge:
        if rank == 0:
            wait_for_shards(prefix, world, args.merge_timeout)
            merge_shards(prefix, overwrite=True)
            final = prefix
        else:
            logger.info("rank %d done; rank 0 merges the shards", rank)
    if args.verify and (rank == 0 or final == shard):
        _print_verify(final)
    return stats


def _run_parts(args, items, settings, rank, world, shard, parts_dir, progress_path, stats) -> None:
    mine = [it for it in items if it.index % world == rank]
    part_size = settings.part_size
    n_parts = math.ceil(len(mine) / part_size) if mine else 0
    _prepare_parts_dir(parts_dir, settings, overwrite=False)
    indexed.cleanup_temporaries(shard)
    done = {p for p in range(n_parts) if indexed.is_complete(parts_dir / _part_name(p) / "data")}
    todo = [p for p in range(n_parts) if p not in done]
    stats.parts_skipped = len(done)
    if done:
        logger.info("resuming %s: %d of %d parts already done", shard, len(done), n_parts)
    fields = indexed.make_schema(
        settings.media, settings.latent_dtype or "uint8", settings.text_kind,
        settings.text_encoder["dim"] if settings.text_encoder else None,
    )
    spec = ClipSpec(
        width=settings.width, height=settings.height, fps=Fraction(settings.fps), frames=settings.frames,
        clips_per_video=settings.clips_per_video,
    )
    workers = _default_workers() if args.workers is None else max(0, int(args.workers))
    if workers > 0:
        # Share the node's cores between the decode processes of all local ranks.
        local_world = max(1, _env_int("LOCAL_WORLD_SIZE", 1))
        spec = dataclasses.replace(spec, decode_threads=max(1, (os.cpu_count() or 1) // (workers * local_world)))
    device = resolve_device(args.device)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    inputs_done = sum(len(mine[p * part_size : (p + 1) * part_size]) for p in done)
    progress = _Progress(len(mine), inputs_done, enabled=(rank == 0 and not args.no_progress),
                         desc=f"preprocess {Path(shard).name}")
    try:
        if todo:
            encoders = Encoders(settings, args, device)
            todo_items = [it for p in todo for it in mine[p * part_size : (p + 1) * part_size]]
            decoded = _iter_decoded(todo_items, spec, workers, window=max(2, 2 * workers))
            hook = _CrashHook()
            try:
                for p in todo:
                    n = len(mine[p * part_size : (p + 1) * part_size])
                    part_results = (next(decoded) for _ in range(n))
                    with atomic_directory(parts_dir / _part_name(p)) as tmp:
                        _write_part(tmp, part_results, encoders, settings, fields, args.batch_size, hook, progress,
                                    stats)
                    stats.parts_done += 1
                    done.add(p)
                    atomic_write_json(progress_path, {
                        "shard": shard, "rank": rank, "world_size": world, "parts_total": n_parts,
                        "parts_done": sorted(done), "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    })
            finally:
                decoded.close()
    finally:
        progress.close()

    # All parts finished: concatenate them into the shard, then drop the parts.
    part_prefixes = [str(parts_dir / _part_name(p) / "data") for p in range(n_parts)]
    manifest_extra = {
        "settings": settings.fingerprint(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": _versions(),
        "rank": rank,
        "world_size": world,
        "fps": float(Fraction(settings.fps)),
        "frames": settings.frames,
        "resolution": [settings.width, settings.height],
        "sources": {"input": settings.input, "num_inputs": settings.num_inputs, "num_inputs_this_shard": len(mine)},
        "order": "input order (rank-major after a merge of several ranks); meta.input_index/clip give the source order",
    }
    if part_prefixes:
        indexed.merge_datasets(part_prefixes, shard, {**manifest_extra, "parts": n_parts}, record_sources=False,
                               same_inputs=True)
    else:
        with indexed.DatasetWriter(shard, fields) as w:
            w.commit(manifest_extra)
    if not args.keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            progress_path.unlink()
    m = indexed.read_manifest(shard)
    logger.info("%s: %d samples, %d rejects", shard, m["num_samples"], m["num_rejects"])


def find_shards(prefix: str) -> tuple[int, list[str]]:
    """The world size and the shard prefixes ``PREFIX_rankK_of_N`` present (complete) on disk."""
    found: dict[int, set[int]] = {}
    for path in glob.glob(glob.escape(prefix) + "_rank*_of_*.json"):
        m = re.fullmatch(re.escape(prefix) + r"_rank(\d+)_of_(\d+)\.json", path)
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not found:
        raise PreprocessError(f"no shards {prefix}_rankK_of_N found to merge")
    if len(found) > 1:
        raise PreprocessError(
            f"shards of several world sizes found for {prefix}: {sorted(found)}; remove the stale ones"
        )
    (world, ranks), = found.items()
    missing = sorted(set(range(world)) - ranks)
    if missing:
        raise PreprocessError(
            f"cannot merge {prefix}: shards of ranks {missing} (of {world}) are missing or unfinished"
        )
    return world, [shard_prefix(prefix, r, world) for r in range(world)]


def wait_for_shards(prefix: str, world: int, timeout: float, poll: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in range(world) if not indexed.is_complete(shard_prefix(prefix, r, world))]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise PreprocessError(f"timed out waiting for the shards of ranks {missing}")
        time.sleep(poll)


def merge_shards(prefix: str, overwrite: bool = False) -> dict[str, Any]:
    """Concatenate ``PREFIX_rank0_of_N .. PREFIX_rank{N-1}_of_N`` into ``PREFIX`` (rank-major order)."""
    world, shards = find_shards(prefix)
    if indexed.is_complete(prefix) and not overwrite:
        raise PreprocessError(f"{prefix} already exists; pass --overwrite to merge again")
    indexed.cleanup_temporaries(prefix)
    sources = dict(indexed.read_manifest(shards[0]).get("sources", {}))
    sources.pop("num_inputs_this_shard", None)
    manifest = indexed.merge_datasets(
        shards, prefix, {"rank": None, "world_size": world, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "shards": [Path(s).name for s in shards], "sources": sources},
        same_inputs=True,
    )
    logger.info("merged %d shards into %s: %d samples, %d rejects", world, prefix, manifest["num_samples"],
                manifest["num_rejects"])
    return manifest


def _print_verify(prefix: str) -> dict[str, Any]:
    summary = indexed.verify_dataset(prefix)
    print(indexed.format_summary(summary), flush=True)
    return summary


@cli_main  # an OSError (permission, a missing folder, a full disk): one line naming the path, status 2
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        stats = process(args)
    except (PreprocessError, InputError, indexed.DatasetError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    if stats.clips or stats.inputs:
        print(
            f"{stats.output}: {stats.inputs} inputs -> {stats.clips} clips, {stats.rejects} rejects "
            f"in {stats.seconds:.2f} s "
            f"({stats.clips_per_second:.1f} clips/s, {stats.mb_per_second_in:.2f} MB/s in, "
            f"{stats.mb_per_second_out:.2f} MB/s out)",
            flush=True,
        )
    return 0
