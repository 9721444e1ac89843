"""On-disk format of preprocessed video/image data sets, on top of Megatron's indexed datasets.

A data set at ``PREFIX`` is a set of Megatron ``IndexedDataset`` pairs, one per field, plus a few
side files::

    PREFIX.json                 manifest, written last: its presence means the data set is complete
    PREFIX_latents.{bin,idx}    VAE latents [C, T', H', W'] (bf16/fp16 bits stored as uint16, or float32)
      or PREFIX_pixels.{bin,idx}  uint8 RGB frames [T, H, W, 3] (when no VAE was used)
    PREFIX_shapes.{bin,idx}     int32, the 4-d shape of each latents/pixels sample
    PREFIX_text.{bin,idx}       text-encoder hidden states [L, D] as bf16 bits (uint16),
                                or token ids [L] (int32)
    PREFIX_textshape.{bin,idx}  int32, [L, D] or [L]
    PREFIX_meta.{bin,idx}       uint8, one UTF-8 JSON object per sample (caption, source, clip, ...)
    PREFIX_captions.jsonl       the same per-sample JSON, one line per sample, for humans and grep
    PREFIX_rejects.jsonl        inputs/clips that were skipped, each with its reason

Megatron's builder knows no 16-bit float type, hence the uint16 views; every sample is one
"document" of one sequence, so sample ``i`` of every field is sequence ``i``. All fields are read
through ``numpy.memmap`` (``IndexedDataset(..., mmap=True)``), so a reader touches only the bytes
of the samples it asks for.

Writers never expose partial files: they write to hidden temporary names and rename everything
into place at the end, the manifest last.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import json
import os
import struct
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from megatron_apt.utils import atomic_write_json, check_plain_name, fsync_dir, get_logger

with warnings.catch_warnings():
    # megatron.core warns at import time about optional fused kernels that this module does not use.
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import (  # noqa: E402
        DType,
        IndexedDataset,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

logger = get_logger(__name__)

FORMAT_NAME = "megatron_apt.video_dataset"
FORMAT_VERSION = 1

# Logical dtype -> numpy storage dtype accepted by Megatron's builder.
_STORAGE = {
    "bfloat16": np.uint16,
    "float16": np.uint16,
    "float32": np.float32,
    "uint8": np.uint8,
    "int32": np.int32,
    "json": np.uint8,
}
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class DatasetError(RuntimeError):
    """A data set on disk is missing, incomplete or inconsistent."""


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------


def field_prefix(prefix: str | os.PathLike, field: str) -> str:
    return f"{prefix}_{field}"


def manifest_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.json"


def rejects_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}_rejects.jsonl"


def captions_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}_captions.jsonl"


def is_complete(prefix: str | os.PathLike) -> bool:
    return os.path.exists(manifest_path(prefix))


def read_manifest(prefix: str | os.PathLike) -> dict[str, Any]:
    path = manifest_path(prefix)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"no data set at {prefix}: {path} does not exist (unfinished or wrong prefix?)") from None
    except ValueError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path} is not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise DatasetError(f"{path} has format version {manifest['version']}, newer than this code ({FORMAT_VERSION})")
    for name in manifest.get("fields") or {}:  # field names become file names: plain names only
        try:
            check_plain_name(name, f"{path}: field name")
        except ValueError as e:
            raise DatasetError(str(e)) from None
    return manifest


def dataset_files(prefix: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    files = [manifest_path(prefix), rejects_path(prefix), captions_path(prefix)]
    for name in manifest["fields"]:
        fp = field_prefix(prefix, name)
        files += [get_bin_path(fp), get_idx_path(fp)]
    return files


def remove_dataset(prefix: str | os.PathLike) -> None:
    """Delete a data set's files (manifest first, so that it stops counting as complete at once)."""
    names = ["latents", "pixels", "shapes", "text", "textshape", "meta"]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(manifest_path(prefix))
    for path in [rejects_path(prefix), captions_path(prefix)] + [
        p for n in names for p in (get_bin_path(field_prefix(prefix, n)), get_idx_path(field_prefix(prefix, n)))
    ]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# ----------------------------------------------------------------------------------------------
# dtype helpers
# ----------------------------------------------------------------------------------------------


def to_storage(x: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """Convert a tensor to the numpy array stored for logical ``dtype`` (16-bit floats as uint16 bits)."""
    if dtype in ("bfloat16", "float16"):
        if not isinstance(x, torch.Tensor):
            x = torch.from_numpy(np.asarray(x))
        x = x.detach().to("cpu", _TORCH_DTYPES[dtype]).contiguous()
        return x.view(torch.int16).numpy().view(np.uint16)
    if dtype == "float32":
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
        return np.ascontiguousarray(x, dtype=np.float32)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=_STORAGE[dtype])


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`to_storage`: a (copied, writable) torch tensor of logical ``dtype``."""
    if dtype in ("bfloat16", "float16"):
        return torch.from_numpy(np.array(a, dtype=np.uint16).view(np.int16)).view(_TORCH_DTYPES[dtype])
    return torch.from_numpy(np.array(a, dtype=_STORAGE[dtype]))


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------


def make_schema(media: str, media_dtype: str, text_kind: str, text_dim: int | None) -> dict[str, Any]:
    """The ``fields`` entry of a manifest.

    media: "latents" (layout C,T,H,W) or "pixels" (layout T,H,W,3, uint8).
    text_kind: "hidden" (bf16 [L, D]) or "ids" (int32 [L]).
    """
    if media not in ("latents", "pixels"):
        raise ValueError(f"media must be 'latents' or 'pixels', got {media!r}")
    if text_kind not in ("hidden", "ids"):
        raise ValueError(f"text_kind must be 'hidden' or 'ids', got {text_kind!r}")
    fields: dict[str, Any] = {}
    if media == "latents":
        fields["latents"] = {"dtype": media_dtype, "layout": "CTHW", "shape_field": "shapes"}
    else:
        fields["pixels"] = {"dtype": "uint8", "layout": "THWC", "shape_field": "shapes"}
    fields["shapes"] = {"dtype": "int32", "per_sample": 4}
    if text_kind == "hidden":
        fields["text"] = {"dtype": "bfloat16", "layout": "LD", "shape_field": "textshape", "dim": text_dim}
        fields["textshape"] = {"dtype": "int32", "per_sample": 2}
    else:
        fields["text"] = {"dtype": "int32", "layout": "L", "shape_field": "textshape"}
        fields["textshape"] = {"dtype": "int32", "per_sample": 1}
    fields["meta"] = {"dtype": "json"}
    for spec in fields.values():
        spec["storage"] = np.dtype(_STORAGE[spec["dtype"]]).name
    return fields


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _tmp_name(path: str, tag: str) -> str:
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.{tag}.tmp")


class DatasetWriter:
    """Writes one data set (all fields) at ``prefix``; nothing is visible until :meth:`commit`.

    ``add`` takes the sample's media as a tensor/array in its natural layout (latents [C,T,H,W]
    float, pixels [T,H,W,3] uint8), the text (hidden [L,D] or ids [L]) and a JSON-able dict.
    """

    def __init__(self, prefix: str | os.PathLike, fields: dict[str, Any]):
        self.prefix = str(prefix)
        self.fields = fields
        self.media = "latents" if "latents" in fields else "pixels"
        self.tag = f"{os.getpid()}-{time.monotonic_ns()}"
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._builders: dict[str, IndexedDatasetBuilder] = {}
        self._pending: list[tuple[str, str]] = []  # (tmp, final)
        for name, spec in fields.items():
            fp = field_prefix(self.prefix, name)
            tmp_bin = _tmp_name(get_bin_path(fp), self.tag)
            self._builders[name] = IndexedDatasetBuilder(tmp_bin, dtype=_STORAGE[spec["dtype"]])
            self._pending.append((tmp_bin, get_bin_path(fp)))
        self._rejects: list[dict[str, Any]] = []
        self._captions_tmp = _tmp_name(captions_path(self.prefix), self.tag)
        self._captions = open(self._captions_tmp, "w", encoding="utf-8")
        self.num_samples = 0
        self.nbytes = 0
        self.shape_counts: dict[str, int] = {}
        self.text_lengths: list[int] = []
        self._closed = False

    # -- adding ------------------------------------------------------------------------------
    def _add(self, name: str, arr: np.ndarray) -> None:
        flat = np.ascontiguousarray(arr).reshape(-1)
        if not flat.flags.writeable:
            flat = flat.copy()  # torch.from_numpy warns on read-only arrays
        self._builders[name].add_item(torch.from_numpy(flat))
        self._builders[name].end_document()
        self.nbytes += arr.nbytes

    def add(self, media: torch.Tensor | np.ndarray, text: torch.Tensor | np.ndarray, meta: dict[str, Any]) -> None:
        spec = self.fields[self.media]
        m = to_storage(media, spec["dtype"])
        if m.ndim != 4:
            raise ValueError(f"{self.media} must be 4-d, got shape {tuple(m.shape)}")
        t = to_storage(text, self.fields["text"]["dtype"])
        want_nd = self.fields["textshape"]["per_sample"]
        if t.ndim != want_nd:
            raise ValueError(f"text must be {want_nd}-d, got shape {tuple(t.shape)}")
        meta_bytes = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        self._add(self.media, m)
        self._add("shapes", np.asarray(m.shape, dtype=np.int32))
        self._add("text", t)
        self._add("textshape", np.asarray(t.shape, dtype=np.int32))
        self._add("meta", np.frombuffer(meta_bytes, dtype=np.uint8))
        self._captions.write(json.dumps({"index": self.num_samples, **meta}, ensure_ascii=False, sort_keys=True) + "\n")
        key = "x".join(str(s) for s in m.shape)
        self.shape_counts[key] = self.shape_counts.get(key, 0) + 1
        self.text_lengths.append(int(t.shape[0]))
        self.num_samples += 1

    def add_reject(self, record: dict[str, Any]) -> None:
        self._rejects.append(record)

    # -- finishing ---------------------------------------------------------------------------
    def _finalize_fields(self) -> None:
        for name, builder in self._builders.items():
            fp = field_prefix(self.prefix, name)
            tmp_idx = _tmp_name(get_idx_path(fp), self.tag)
            builder.finalize(tmp_idx)
            self._pending.append((tmp_idx, get_idx_path(fp)))
        self._captions.close()
        self._pending.append((self._captions_tmp, captions_path(self.prefix)))
        tmp_rej = _tmp_name(rejects_path(self.prefix), self.tag)
        with open(tmp_rej, "w", encoding="utf-8") as f:
            for r in self._rejects:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        self._pending.append((tmp_rej, rejects_path(self.prefix)))

    def summary(self) -> dict[str, Any]:
        tl = self.text_lengths
        return {
            "num_samples": self.num_samples,
            "num_rejects": len(self._rejects),
            "shapes": dict(sorted(self.shape_counts.items())),
            "text_length": {"min": min(tl), "max": max(tl), "mean": float(np.mean(tl))} if tl else None,
            "nbytes": self.nbytes,
        }

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Finish all files and rename them into place; the manifest goes last. Returns the manifest."""
        if self._closed:
            raise RuntimeError("DatasetWriter already committed")
        self._finalize_fields()
        manifest = {
            **manifest,
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fields": self.fields,
            "media": self.media,
            **self.summary(),
        }
        _commit(self._pending, self.prefix, manifest)
        self._closed = True
        return manifest

    def abort(self) -> None:
        if self._closed:
            return
        for b in self._builders.values():
            with contextlib.suppress(Exception):
                b.data_file.close()
        with contextlib.suppress(Exception):
            self._captions.close()
        for tmp, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        for name in self.fields:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_tmp_name(get_idx_path(field_prefix(self.prefix, name)), self.tag))
        for path in (_tmp_name(rejects_path(self.prefix), self.tag), self._captions_tmp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._closed = True

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _commit(pending: Sequence[tuple[str, str]], prefix: str, manifest: dict[str, Any]) -> None:
    # An old manifest must disappear before its data files are replaced, so that a crash in the
    # middle of the renames never leaves a manifest next to mismatched data.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(manifest_path(prefix))
    for tmp, _ in pending:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    mode = 0o666 & ~_umask()
    for tmp, final in pending:
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    atomic_write_json(manifest_path(prefix), manifest)
    os.chmod(manifest_path(prefix), mode)  # the temporary file behind atomic_write is private (0600)
    fsync_dir(Path(prefix).parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cleanup_temporaries(prefix: str | os.PathLike) -> int:
    """Remove hidden temporaries left by a writer that was killed. Returns how many were removed."""
    d, base = os.path.split(str(prefix))
    n = 0
    for p in glob.glob(os.path.join(d or ".", f".{glob.escape(base)}*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
            n += 1
    return n


# ----------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------

# Manifest keys that describe how the data was made; they must agree between merged data sets.
_SETTING_KEYS = ("fields", "media", "settings")
# Settings that only say which inputs a data set came from: data sets of different inputs (say, an
# image set and a video set made alike) may be merged, shards of one run must agree on them too.
_INPUT_KEYS = ("input_fingerprint", "num_inputs", "world_size", "part_size")


def merge_datasets(
    sources: Sequence[str | os.PathLike],
    prefix: str | os.PathLike,
    manifest_extra: dict[str, Any] | None = None,
    record_sources: bool = True,
    same_inputs: bool = False,
) -> dict[str, Any]:
    """Concatenate complete data sets into one at ``prefix`` (Megatron ``add_index``), in the given order.

    The merged data set holds the samples of ``sources[0]``, then ``sources[1]``, ... Rejects and
    captions are concatenated the same way; the manifest sums the counts. The sources must have been
    made with the same settings (fields, resolution, fps, encoders, ...); with ``same_inputs`` also
    from the same input list (the shards or parts of one run).
    """
    if not sources:
        raise ValueError("merge_datasets needs at least one source")
    prefix = str(prefix)
    manifests = [read_manifest(s) for s in sources]
    first = manifests[0]
    ignore = () if same_inputs else _INPUT_KEYS
    for s, m in zip(sources[1:], manifests[1:]):
        for key in _SETTING_KEYS:
            a, b = _strip_for_compare(m.get(key), ignore), _strip_for_compare(first.get(key), ignore)
            if a != b:
                diff = []
                if isinstance(a, dict) and isinstance(b, dict):
                    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                where = f" (in {', '.join(diff)})" if diff else ""
                raise DatasetError(f"cannot merge {s} with {sources[0]}: their {key!r} differ{where}")
    fields = first["fields"]
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    # Megatron's add_index runs gc.collect() per call, which takes ~0.3 s in a process holding torch
    # and megatron; freezing the existing objects makes those collections cheap.
    gc.freeze()
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[str, str]] = []
    try:
        for name, spec in fields.items():
            out_fp = field_prefix(prefix, name)
            tmp_bin = _tmp_name(get_bin_path(out_fp), tag)
            builder = IndexedDatasetBuilder(tmp_bin, dtype=_STORAGE[spec["dtype"]])
            pending.append((tmp_bin, get_bin_path(out_fp)))
            for src in sources:
                builder.add_index(field_prefix(src, name))
            tmp_idx = _tmp_name(get_idx_path(out_fp), tag)
            builder.finalize(tmp_idx)
            pending.append((tmp_idx, get_idx_path(out_fp)))
        tmp_cap = _tmp_name(captions_path(prefix), tag)
        offset = 0
        with open(tmp_cap, "w", encoding="utf-8") as out:
            for src, m in zip(sources, manifests):
                with open(captions_path(src), encoding="utf-8") as f:
                    for line in f:
                        rec = json.loads(line)
                        rec["index"] = offset + int(rec["index"])
                        out.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
                offset += int(m["num_samples"])
        pending.append((tmp_cap, captions_path(prefix)))
        tmp_rej = _tmp_name(rejects_path(prefix), tag)
        with open(tmp_rej, "w", encoding="utf-8") as out:
            for src in sources:
                with open(rejects_path(src), encoding="utf-8") as f:
                    for line in f:
                        out.write(line)
        pending.append((tmp_rej, rejects_path(prefix)))

        shapes: dict[str, int] = {}
        tl_min, tl_max, tl_sum = None, None, 0.0
        for m in manifests:
            for k, v in m.get("shapes", {}).items():
                shapes[k] = shapes.get(k, 0) + int(v)
            tl = m.get("text_length")
            if tl:
                tl_min = tl["min"] if tl_min is None else min(tl_min, tl["min"])
                tl_max = tl["max"] if tl_max is None else max(tl_max, tl["max"])
                tl_sum += tl["mean"] * m["num_samples"]
        n = sum(int(m["num_samples"]) for m in manifests)
        merged = {k: v for k, v in first.items() if k not in ("shards", "merged_from")}
        if not same_inputs and isinstance(first.get("settings"), dict):
            settings = dict(first["settings"])
            for key in _INPUT_KEYS:
                if any((m.get("settings") or {}).get(key) != settings.get(key) for m in manifests):
                    settings[key] = None  # differs between the sources
            merged["settings"] = settings
        merged.update(
            {
                "num_samples": n,
                "num_rejects": sum(int(m["num_rejects"]) for m in manifests),
                "nbytes": sum(int(m.get("nbytes", 0)) for m in manifests),
                "shapes": dict(sorted(shapes.items())),
                "text_length": {"min": tl_min, "max": tl_max, "mean": tl_sum / n} if n else None,
            }
        )
        if record_sources:
            merged["merged_from"] = [
                {"prefix": os.path.basename(str(s)), "num_samples": m["num_samples"], "num_rejects": m["num_rejects"]}
                for s, m in zip(sources, manifests)
            ]
        if manifest_extra:
            merged.update(manifest_extra)
        _commit(pending, prefix, merged)
        return merged
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    finally:
        gc.unfreeze()


def _strip_for_compare(value: Any, ignore: Sequence[str] = ()) -> Any:
    if isinstance(value, dict):
        return {k: _strip_for_compare(v) for k, v in value.items() if k not in ("rank", *ignore)}
    return value


# ----------------------------------------------------------------------------------------------
# Reading and verifying
# ----------------------------------------------------------------------------------------------


def _read_idx_header(idx_path: str) -> tuple[int, int, int]:
    """(dtype code, sequence count, document count) of a Megatron .idx file."""
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != b"MMIDIDX\x00\x00":
        raise DatasetError(f"{idx_path}: not a Megatron index file (bad header)")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise DatasetError(f"{idx_path}: unsupported index version {version}")
    code = head[17]
    seq, docs = struct.unpack("<QQ", head[18:34])
    return code, seq, docs


def open_field(prefix: str | os.PathLike, name: str) -> IndexedDataset:
    return IndexedDataset(field_prefix(prefix, name), multimodal=False, mmap=True)


def verify_dataset(prefix: str | os.PathLike, check_values: bool = True) -> dict[str, Any]:
    """Re-read a data set and check that index and data agree; raise :class:`DatasetError` on any problem.

    Checks: the manifest; every field's .idx header, dtype and sequence count; .bin size equal to the
    sum of the sequence lengths; contiguous pointers; every sample's shape record matching its length;
    every metadata record parsing as JSON; the captions file line count; with ``check_values`` also
    that float latents/hidden states are finite. Returns a summary dict.
    """
    t0 = time.perf_counter()
    prefix = str(prefix)
    manifest = read_manifest(prefix)
    n = int(manifest["num_samples"])
    fields = manifest["fields"]
    problems: list[str] = []
    sizes: dict[str, int] = {}
    for name, spec in fields.items():
        fp = field_prefix(prefix, name)
        idx, bin_ = get_idx_path(fp), get_bin_path(fp)
        for p in (idx, bin_):
            if not os.path.exists(p):
                raise DatasetError(f"{p} is missing")
        code, seq, docs = _read_idx_header(idx)
        want = DType.code_from_dtype(_STORAGE[spec["dtype"]])
        if code != want:
            problems.append(f"{name}: .idx dtype code {code}, manifest says {spec['storage']} ({want})")
        if seq != n:
            problems.append(f"{name}: .idx holds {seq} sequences, manifest says {n} samples")
        sizes[name] = os.path.getsize(bin_)
        if n == 0:
            if sizes[name] != 0:
                problems.append(f"{name}: empty data set but .bin holds {sizes[name]} bytes")
            continue
        ds = open_field(prefix, name)
        lengths = ds.sequence_lengths.astype(np.int64)
        pointers = ds.index.sequence_pointers.astype(np.int64)
        itemsize = np.dtype(_STORAGE[spec["dtype"]]).itemsize
        expect_ptr = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * itemsize
        if not np.array_equal(pointers, expect_ptr):
            problems.append(f"{name}: sequence pointers are not contiguous")
        if int(lengths.sum()) * itemsize != sizes[name]:
            problems.append(f"{name}: .bin is {sizes[name]} bytes, index describes {int(lengths.sum()) * itemsize}")
        if "per_sample" in spec and not np.all(lengths == spec["per_sample"]):
            problems.append(f"{name}: expected {spec['per_sample']} values per sample")
        del ds
    if problems:
        raise DatasetError(f"{prefix}: " + "; ".join(problems))

    media = manifest["media"]
    text_lengths: list[int] = []
    shape_counts: dict[str, int] = {}
    if n:
        dsets = {name: open_field(prefix, name) for name in fields}
        mspec, tspec = fields[media], fields["text"]
        for i in range(n):
            shape = np.array(dsets["shapes"][i])
            if np.any(shape <= 0) or int(np.prod(shape.astype(np.int64))) != len(dsets[media][i]):
                problems.append(
                    f"sample {i}: {media} length {len(dsets[media][i])} does not match shape {shape.tolist()}"
                )
            elif check_values and mspec["dtype"] != "uint8":
                if not torch.isfinite(from_storage(dsets[media][i], mspec["dtype"]).float()).all():
                    problems.append(f"sample {i}: {media} hold non-finite values")
            tshape = np.array(dsets["textshape"][i])
            if int(np.prod(tshape.astype(np.int64))) != len(dsets["text"][i]):
                problems.append(
                    f"sample {i}: text length {len(dsets['text'][i])} does not match shape {tshape.tolist()}"
                )
            elif check_values and tspec["dtype"] == "bfloat16":
                if not torch.isfinite(from_storage(dsets["text"][i], "bfloat16").float()).all():
                    problems.append(f"sample {i}: text hidden states hold non-finite values")
            try:
                json.loads(bytes(dsets["meta"][i]).decode("utf-8"))
            except ValueError as e:
                problems.append(f"sample {i}: metadata is not valid JSON ({e})")
            key = "x".join(str(int(s)) for s in shape)
            shape_counts[key] = shape_counts.get(key, 0) + 1
            text_lengths.append(int(tshape[0]))
            if len(problems) > 20:
                break
        del dsets
    try:
        with open(captions_path(prefix), encoding="utf-8") as f:
            n_cap = sum(1 for _ in f)
        if n_cap != n:
            problems.append(f"captions file has {n_cap} lines, expected {n}")
    except FileNotFoundError:
        problems.append(f"{captions_path(prefix)} is missing")
    n_rej = 0
    try:
        with open(rejects_path(prefix), encoding="utf-8") as f:
            for line in f:
                json.loads(line)
                n_rej += 1
    except FileNotFoundError:
        problems.append(f"{rejects_path(prefix)} is missing")
    except ValueError:
        problems.append("rejects file holds a line that is not JSON")
    if n_rej != int(manifest.get("num_rejects", n_rej)):
        problems.append(f"rejects file has {n_rej} records, manifest says {manifest['num_rejects']}")
    if problems:
        raise DatasetError(f"{prefix}: " + "; ".join(problems[:20]))
    return {
        "prefix": prefix,
        "num_samples": n,
        "num_rejects": n_rej,
        "media": media,
        "shapes": dict(sorted(shape_counts.items())),
        "text": fields["text"]["dtype"] + (" hidden" if fields["text"]["layout"] == "LD" else " ids"),
        "text_length": (
            {"min": min(text_lengths), "max": max(text_lengths), "mean": round(float(np.mean(text_lengths)), 2)}
            if text_lengths
            else None
        ),
        "bytes": sizes,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"data set      {summary['prefix']}",
        f"samples       {summary['num_samples']}  (rejects: {summary['num_rejects']})",
        f"media         {summary['media']}",
        "shapes        " + (", ".join(f"{k}: {v}" for k, v in summary["shapes"].items()) or "-"),
        f"text          {summary['text']}, length {summary['text_length']}",
        "bytes         " + ", ".join(f"{k}={v}" for k, v in summary["bytes"].items()),
        f"verified in   {summary['seconds']} s",
    ]
    return "\n".join(lines)


def iter_rejects(prefix: str | os.PathLike) -> Iterable[dict[str, Any]]:
    with open(rejects_path(prefix), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
