"""Reading source media for preprocessing: listing inputs, decoding videos into fixed-fps clips, images.

Everything here is CPU-only and imports neither torch nor megatron, so that decode worker processes
start quickly.

Conventions
-----------
* A clip is ``uint8 [T, H, W, 3]`` RGB, already resized and centre-cropped to the target ``W x H``.
* Resize: the source is scaled (uniformly) so that it *covers* ``W x H`` (for a landscape target
  and a landscape source this means matching the short side), then the centre is cropped.
  Vertical videos therefore lose their top and bottom when the target is landscape.
* Frame-rate resampling: for each target timestamp ``start + k / fps`` the source frame whose
  presentation time is nearest is taken (ties go to the earlier frame). Exact rational
  arithmetic keeps this deterministic. A target timestamp counts as covered only when it lies
  before the end of the last decoded frame (its pts plus its duration), so a clip is never padded
  by repeating the last frame past the end of the video.
* Clip placement: with ``clips_per_video = K`` and a video long enough for ``n <= K``
  non-overlapping clips, the ``n`` clips are spread evenly from the start to the end of the
  video (the first starts at the first frame, the last ends at the last frame). A single clip
  starts at the first frame.
* Grayscale, palette, 16-bit and alpha images are converted to 8-bit RGB; alpha is composited
  over black. Display-matrix rotation of phone videos is applied.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

import numpy as np

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".gif"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


class InputError(ValueError):
    """The input specification itself is unusable (missing path, malformed CSV header, ...)."""


@dataclass
class InputItem:
    """One source file to preprocess.

    ``index`` is its position in the full, deterministic input list (the sharding key: item ``i``
    goes to rank ``i % world_size``). ``source`` is how it is recorded in the output metadata
    (relative to the input folder, or as written in the CSV/JSONL). ``error`` is set when the item
    is already known to be bad at listing time (it is then rejected without being opened).
    """

    index: int
    path: str
    source: str
    kind: str  # "video" | "image" | "unknown"
    caption: str | None = None
    caption_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class ClipSpec:
    """What clips to cut: target size, frame rate and length, and decode threading."""

    width: int
    height: int
    fps: Fraction
    frames: int
    clips_per_video: int = 1
    decode_threads: int = 0  # 0: let libav choose

    @property
    def clip_seconds(self) -> Fraction:
        return Fraction(self.frames) / self.fps


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    clip_index: int
    start: float  # seconds from the first frame of the source


@dataclass
class DecodeResult:
    item: InputItem
    caption: str | None
    clips: list[Clip] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0

    def reject(self, reason: str, clip: int | None = None) -> "DecodeResult":
        self.rejects.append({"clip": clip, "reason": reason})
        return self


# ----------------------------------------------------------------------------------------------
# Argument helpers
# ----------------------------------------------------------------------------------------------


def parse_resolution(text: str) -> tuple[int, int]:
    """Parse ``"WxH"`` (e.g. ``"1280x720"``) into ``(width, height)``."""
    parts = str(text).lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"bad --resolution {text!r}: expected WIDTHxHEIGHT, e.g. 1280x720")
    w, h = int(parts[0]), int(parts[1])
    if w <= 0 or h <= 0:
        raise InputError(f"bad --resolution {text!r}: width and height must be positive")
    return w, h


def parse_fps(value: float | str | Fraction) -> Fraction:
    """Parse a frame rate (``24``, ``23.976``, ``"30000/1001"``) into an exact fraction."""
    try:
        fps = Fraction(str(value)).limit_denominator(1_000_000)
    except (ValueError, ZeroDivisionError) as e:
        raise InputError(f"bad --fps {value!r}: expected a positive number such as 24 or 30000/1001") from e
    if fps <= 0:
        raise InputError(f"bad --fps {value!r}: must be positive")
    return fps


def media_kind(path: str | os.PathLike) -> str:
    ext = Path(path).suffix.lower()
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return "unknown"


# ----------------------------------------------------------------------------------------------
# Input listing
# ----------------------------------------------------------------------------------------------


def list_inputs(spec: str | os.PathLike) -> list[InputItem]:
    """List the inputs of a folder (``name.mp4`` + ``name.txt``), a CSV (``path,caption``) or a JSONL.

    Folders are walked recursively and sorted by relative path; CSV/JSONL keep their row order.
    Relative paths in CSV/JSONL are resolved against the file's folder. Extra CSV columns and JSONL
    keys are kept in ``InputItem.extra`` and end up in each sample's metadata (the toy data set
    uses this for its digit/motion labels).
    """
    path = Path(spec)
    if not path.exists():
        raise InputError(f"--input {str(spec)!r} does not exist")
    if path.is_dir():
        return _list_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _list_csv(path)
    if suffix in (".jsonl", ".json"):
        return _list_jsonl(path)
    raise InputError(f"--input {str(spec)!r}: expected a folder, a .csv or a .jsonl file")


def _list_folder(root: Path) -> list[InputItem]:
    media: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if media_kind(p) != "unknown":
                media.append((p.relative_to(root).as_posix(), p))
    media.sort(key=lambda x: x[0])
    items = []
    for i, (rel, p) in enumerate(media):
        # Captions are read later, in the decode worker, so that each rank only reads its own.
        items.append(
            InputItem(index=i, path=str(p), source=rel, kind=media_kind(p), caption_path=str(p.with_suffix(".txt")))
        )
    return items


def _resolve(base: Path, p: str) -> str:
    q = Path(os.path.expanduser(p))
    return str(q if q.is_absolute() else base / q)


def _make_item(index: int, base: Path, path: Any, caption: Any, extra: dict[str, Any], where: str) -> InputItem:
    if not isinstance(path, str) or not path.strip():
        return InputItem(index=index, path="", source=f"<{where}>", kind="unknown", extra=extra, error="missing path")
    path = path.strip()
    item = InputItem(
        index=index,
        path=_resolve(base, path),
        source=path,
        kind=media_kind(path),
        caption=caption if isinstance(caption, str) else None,
        extra=extra,
    )
    if item.kind == "unknown":
        item.error = f"unsupported file type {Path(path).suffix or '(no extension)'!r}"
    return item


def _list_csv(path: Path) -> list[InputItem]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in fields or "caption" not in fields:
            raise InputError(
                f"--input {str(path)!r}: the CSV needs a header with 'path' and 'caption' columns, got {fields}"
            )
        items = []
        for i, row in enumerate(reader):
            row = {(k or "").strip(): v for k, v in row.items()}
            extra = {k: v for k, v in row.items() if k not in ("path", "caption") and k}
            where = f"{path.name} row {i + 2}"
            items.append(_make_item(i, path.parent, row.get("path"), row.get("caption"), extra, where))
    return items


def _list_jsonl(path: Path) -> list[InputItem]:
    items = []
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    for i, line in enumerate(lines):
        where = f"{path.name} line {i + 1}"
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            items.append(InputItem(index=i, path="", source=f"<{where}>", kind="unknown", error=f"invalid JSON: {e}"))
            continue
        extra = {k: v for k, v in obj.items() if k not in ("path", "caption")}
        items.append(_make_item(i, path.parent, obj.get("path"), obj.get("caption"), extra, where))
    return items


def inputs_fingerprint(items: Iterable[InputItem]) -> str:
    """A short hash of the input list (paths only), to detect a resume against a different input."""
    import hashlib

    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.index}\t{it.source}\n".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def cover_geometry(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """Size to resize ``src`` to so that it covers ``dst``, and the top-left of the centred crop.

    Returns ``(resized_w, resized_h, x0, y0)``.
    """
    scale = max(dst_w / src_w, dst_h / src_h)
    rw = max(dst_w, int(round(src_w * scale)))
    rh = max(dst_h, int(round(src_h * scale)))
    return rw, rh, (rw - dst_w) // 2, (rh - dst_h) // 2


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def decode_worker_init() -> None:
    """Initializer of decode worker processes: exit when the parent goes away.

    Pool workers block on their task queue and would outlive a parent that was killed with
    SIGKILL; a daemon thread notices the re-parenting and ends the worker.
    """
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def decode_item(item: InputItem, spec: ClipSpec) -> DecodeResult:
    """Decode one input into clips. Never raises: every problem becomes a reject with a reason."""
    import time

    t0 = time.perf_counter()
    result = DecodeResult(item=item, caption=None)
    try:
        _decode_into(item, spec, result)
    except Exception as e:  # a decoder bug must not stop the job
        result.clips = []
        result.reject(f"unexpected error: {type(e).__name__}: {e}")
    result.seconds = time.perf_counter() - t0
    return result


def _read_caption(item: InputItem) -> tuple[str | None, str | None]:
    """Return ``(caption, error)``."""
    caption = item.caption
    if caption is None and item.caption_path is not None:
        try:
            with open(item.caption_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, f"missing caption file {Path(item.caption_path).name}"
        except OSError as e:
            return None, f"cannot read caption file: {e}"
        try:
            caption = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None, "caption file is not valid UTF-8"
    if caption is None:
        return None, "missing caption"
    caption = caption.strip()
    if not caption:
        return None, "empty caption"
    return caption, None


def _decode_into(item: InputItem, spec: ClipSpec, result: DecodeResult) -> None:
    if item.error:
        result.reject(item.error)
        return
    caption, err = _read_caption(item)
    if err:
        result.reject(err)
        return
    result.caption = caption
    try:
        size = os.path.getsize(item.path)
    except OSError as e:
        result.reject(f"cannot read file: {e.strerror or e}")
        return
    result.bytes_read = size
    if size == 0:
        result.reject("empty file (0 bytes)")
        return
    if item.kind == "image":
        _read_image(item, spec, result)
    elif item.kind == "video":
        _read_video(item, spec, result)
    else:
        result.reject("unsupported file type")


def _read_image(item: InputItem, spec: ClipSpec, result: DecodeResult) -> None:
    from PIL import Image, ImageOps

    try:
        with Image.open(item.path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = image_to_rgb(im)
    except Exception as e:
        result.reject(f"cannot decode image: {type(e).__name__}: {e}")
        return
    h, w = rgb.shape[:2]
    result.info = {"source_size": [w, h], "source_fps": None, "duration": None}
    frame = resize_center_crop(rgb, spec.width, spec.height)
    # An image is a one-frame clip, whatever the clip length asked for videos.
    result.clips.append(Clip(frames=frame[None], clip_index=0, start=0.0))


def image_to_rgb(im: Any) -> np.ndarray:
    """Convert a PIL image of any mode to ``uint8 [H, W, 3]`` RGB (alpha composited over black)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        peak = 65535.0 if (mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        g = np.clip(np.round(a * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        g = np.clip(np.round(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[..., 3:4]
        return ((rgba[..., :3] * alpha + 127) // 255).astype(np.uint8)
    if mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def resize_center_crop(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an ``uint8 [H, W, 3]`` image to cover ``width x height`` and crop the centre (Pillow)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    rw, rh, x0, y0 = cover_geometry(w, h, width, height)
    if (rw, rh) != (w, h):
        resample = Image.Resampling.LANCZOS if rw < w else Image.Resampling.BICUBIC
        rgb = np.asarray(Image.fromarray(rgb).resize((rw, rh), resample=resample))
    return np.ascontiguousarray(rgb[y0 : y0 + height, x0 : x0 + width])


def _stream_duration(container: Any, stream: Any) -> Fraction | None:
    """Duration of the video stream from container metadata, or None when it is not recorded."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return Fraction(stream.duration) * stream.time_base
    if container.duration is not None and container.duration > 0:
        start = Fraction(container.start_time or 0, 1_000_000)
        stream_start = Fraction(stream.start_time) * stream.time_base if stream.start_time is not None else start
        return Fraction(container.duration, 1_000_000) - (stream_start - start)
    return None


def _demux_duration(path: str) -> Fraction | None:
    """Duration from the packets' timestamps (reads the file but does not decode it)."""
    import av

    end = None
    start = None
    with av.open(path) as container:
        stream = container.streams.video[0]
        tb = stream.time_base
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            t0 = Fraction(packet.pts) * tb
            t1 = t0 + Fraction(packet.duration or 0) * tb
            start = t0 if start is None else min(start, t0)
            end = t1 if end is None else max(end, t1)
    if end is None or start is None:
        return None
    return end - start


def plan_clip_starts(duration: Fraction | None, spec: ClipSpec) -> list[Fraction]:
    """Start offsets (seconds from the first frame) of the clips to cut from a video.

    With a known duration: ``n = min(clips_per_video, floor(duration / clip_seconds))`` clips spread
    evenly over the video (none when it is shorter than one clip). With an unknown duration: up to
    ``clips_per_video`` back-to-back clips from the start; the ones the video does not cover are
    rejected after decoding.
    """
    clip = spec.clip_seconds
    if duration is None:
        return [clip * j for j in range(spec.clips_per_video)]
    n = min(spec.clips_per_video, math.floor(duration / clip))
    if n <= 0:
        return []
    if n == 1:
        return [Fraction(0)]
    step = (duration - clip) / (n - 1)
    return [step * j for j in range(n)]


class _FrameConverter:
    """Converts decoded frames to cropped RGB arrays, caching the geometry per source size."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self._geom: dict[tuple[int, int, int], tuple] = {}

    def __call__(self, frame: Any) -> np.ndarray:
        rotation = int(getattr(frame, "rotation", 0) or 0)
        quarter = int(round(rotation / 90.0)) % 4  # counter-clockwise quarter turns to display orientation
        key = (frame.width, frame.height, quarter)
        geom = self._geom.get(key)
        if geom is None:
            dw, dh = (frame.height, frame.width) if quarter % 2 else (frame.width, frame.height)
            rw, rh, x0, y0 = cover_geometry(dw, dh, self.width, self.height)
            sw, sh = (rh, rw) if quarter % 2 else (rw, rh)  # resize in the stored orientation
            interp = "AREA" if rw * rh < dw * dh else "BICUBIC"
            geom = self._geom[key] = (sw, sh, x0, y0, interp)
        sw, sh, x0, y0, interp = geom
        rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation=interp).to_ndarray()
        if quarter:
            rgb = np.rot90(rgb, k=quarter)
        return rgb[y0 : y0 + self.height, x0 : x0 + self.width]


def _read_video(item: InputItem, spec: ClipSpec, result: DecodeResult) -> None:
    import av

    try:
        container = av.open(item.path, metadata_errors="ignore")
    except Exception as e:
        result.reject(f"cannot open video: {type(e).__name__}: {e}")
        return
    with container:
        if not container.streams.video:
            result.reject("no video stream")
            return
        stream = container.streams.video[0]
        cc = stream.codec_context
        # Frame threads cost more to start than they save on small frames (measured: 9 ms vs 1.5 ms
        # per 16-frame 32x32 h264 video), so small videos decode single-threaded.
        small = (cc.width or 0) * (cc.height or 0) < 500_000
        cc.thread_type = "AUTO"
        cc.thread_count = 1 if small else spec.decode_threads
        tb = stream.time_base
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        default_dur = Fraction(1) / Fraction(rate) if rate else Fraction(1, 25)
        t_first = Fraction(stream.start_time) * tb if stream.start_time is not None else None

        duration = _stream_duration(container, stream)
        if duration is None:
            try:
                duration = _demux_duration(item.path)
            except Exception:
                duration = None
        starts = plan_clip_starts(duration, spec)
        result.info = {
            "source_size": [stream.codec_context.width, stream.codec_context.height],
            "source_fps": float(rate) if rate else None,
            "duration": float(duration) if duration is not None else None,
        }
        if not starts:
            result.reject(
                f"video shorter than one clip ({float(duration):.3f} s < {float(spec.clip_seconds):.3f} s)"
            )
            return

        convert = _FrameConverter(spec.width, spec.height)
        n_clips = len(starts)
        buffers = [np.empty((spec.frames, spec.height, spec.width, 3), np.uint8) for _ in range(n_clips)]
        filled = [0] * n_clips
        # Target times are relative to the first frame and strictly increasing (clips do not overlap).
        offsets = [(j, k, starts[j] + Fraction(k) / spec.fps) for j in range(n_clips) for k in range(spec.frames)]
        targets: list[Fraction] = []  # absolute target times, filled once the first frame's time is known
        ti = 0
        prev_t = prev_frame = None
        prev_dur = default_dur
        cache_key = cache_arr = None
        decode_error = None

        def take(frame: Any, ft: Fraction) -> None:
            nonlocal ti, cache_key, cache_arr
            if cache_key != ft:
                cache_key, cache_arr = ft, convert(frame)
            j, k, _ = offsets[ti]
            buffers[j][k] = cache_arr
            filled[j] += 1
            ti += 1

        try:
            for frame in container.decode(stream):
                if frame.pts is not None:
                    ft = Fraction(frame.pts) * tb
                elif prev_t is not None:
                    ft = prev_t + prev_dur
                else:
                    ft = t_first if t_first is not None else Fraction(0)
                if t_first is None:
                    t_first = ft
                if not targets:
                    targets = [t_first + o[2] for o in offsets]
                if prev_t is not None and ft <= prev_t:
                    continue  # duplicate or out-of-order timestamp: keep the first
                while ti < len(targets) and targets[ti] <= ft:
                    target = targets[ti]
                    if prev_t is not None and (target - prev_t) <= (ft - target):
                        take(prev_frame, prev_t)
                    else:
                        take(frame, ft)
                if ti == len(offsets):
                    break
                if prev_t is not None:
                    prev_dur = ft - prev_t
                fd = Fraction(frame.duration) * tb if getattr(frame, "duration", None) else None
                prev_t, prev_frame = ft, frame
                if fd:
                    prev_dur = fd
        except Exception as e:  # truncated or corrupt data: keep what decoded cleanly
            decode_error = f"{type(e).__name__}: {e}"

        # Targets after the last decoded frame are covered only while that frame is still on screen.
        if prev_t is not None and t_first is not None:
            end = prev_t + prev_dur
            while ti < len(targets) and targets[ti] < end:
                take(prev_frame, prev_t)

        decoded_until = float(prev_t + prev_dur - t_first) if prev_t is not None and t_first is not None else 0.0
        for j in range(n_clips):
            if filled[j] == spec.frames:
                result.clips.append(Clip(frames=buffers[j], clip_index=j, start=float(starts[j])))
            else:
                why = f"decode error after {decoded_until:.3f} s ({decode_error})" if decode_error else (
                    f"video ends at {decoded_until:.3f} s"
                )
                result.reject(
                    f"clip shorter than {float(spec.clip_seconds):.3f} s: got {filled[j]}/{spec.frames} frames from "
                    f"{float(starts[j]):.3f} s, {why}",
                    clip=j,
                )
        if prev_t is None and not result.clips:
            # Nothing decoded at all: report that instead of one reject per clip.
            result.rejects = [{"clip": None, "reason": f"no decodable frames ({decode_error or 'empty stream'})"}]
