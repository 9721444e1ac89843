"""The on-disk format: bit-exact round trips for every dtype, merging, and verification catching corruption."""

import json
import os

import numpy as np
import pytest
import torch

from megatron_apt.data import indexed
from megatron_apt.data.dataset import LatentVideoDataset, collate_video_text


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Signed zeros, subnormals and extreme magnitudes of each dtype must survive bit for bit.
_SPECIAL = {
    "bfloat16": [0.0, -0.0, 1e-40, -3e-39, 3e38, -1e-30],
    "float16": [0.0, -0.0, 6e-8, -3e-6, 65000.0, -1e-4],
    "float32": [0.0, -0.0, 1e-44, -3e-39, 3e38, -1e-30],
}


def _special(n: int, seed: int, dtype: str = "bfloat16") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10
    x[:6] = torch.tensor(_SPECIAL[dtype])
    return x.to(_DTYPES[dtype])


def _write(prefix, media="latents", media_dtype="bfloat16", text_kind="hidden", n=5, shapes=None, seed=0):
    fields = indexed.make_schema(media, media_dtype, text_kind, 6 if text_kind == "hidden" else None)
    written = []
    shapes = shapes or [(4, 3, 2, 5)] * n
    g = torch.Generator().manual_seed(seed)
    with indexed.DatasetWriter(prefix, fields) as w:
        for i, shape in enumerate(shapes):
            if media == "latents":
                m = _special(int(np.prod(shape)), seed + i, media_dtype).reshape(shape)
            else:
                m = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).numpy()
            L = 1 + i % 4
            if text_kind == "hidden":
                t = _special(L * 6, 100 + seed + i).reshape(L, 6)
            else:
                t = np.arange(1, L + 1, dtype=np.int32) * (i + 1)
            meta = {"caption": f"caption {i} é✓", "source": f"v{i}.mp4", "clip": 0}
            w.add(m, t, meta)
            written.append((m, t, meta))
        w.add_reject({"source": "bad.mp4", "reason": "empty file (0 bytes)"})
        manifest = w.commit({"settings": {"note": "test"}})
    return written, manifest


def _bits(x):
    if isinstance(x, torch.Tensor):
        if x.dtype in (torch.bfloat16, torch.float16):
            return x.view(torch.int16).numpy()
        return x.numpy()
    return np.asarray(x)


@pytest.mark.parametrize("media_dtype", ["bfloat16", "float16", "float32"])
def test_latent_round_trip_is_bit_exact(tmp_path, media_dtype):
    prefix = str(tmp_path / "ds")
    written, manifest = _write(prefix, media_dtype=media_dtype)
    assert manifest["num_samples"] == 5 and manifest["num_rejects"] == 1
    ds = LatentVideoDataset(prefix)
    assert len(ds) == 5 and ds.media == "latents" and ds.text_kind == "hidden"
    for i, (m, t, meta) in enumerate(written):
        s = ds[i]
        assert s["latents"].dtype == m.dtype and tuple(s["latents"].shape) == tuple(m.shape)
        assert np.array_equal(_bits(s["latents"]), _bits(m))  # bit for bit, -0.0 and subnormals included
        assert s["text"].dtype == torch.bfloat16 and np.array_equal(_bits(s["text"]), _bits(t))
        assert s["text_len"] == t.shape[0] and s["caption"] == meta["caption"] and s["meta"] == meta
    assert ds.bucket_keys() == [(3, 2, 5)] * 5 and ds.shape(0) == (4, 3, 2, 5)
    # the raw files are ordinary Megatron indexed datasets, uint16 for 16-bit floats
    raw = indexed.open_field(prefix, "latents")
    assert raw.index.dtype == (np.float32 if media_dtype == "float32" else np.uint16)
    assert indexed.verify_dataset(prefix)["num_samples"] == 5


def test_pixels_and_token_ids_round_trip(tmp_path):
    prefix = str(tmp_path / "px")
    shapes = [(3, 4, 6, 3), (1, 4, 6, 3), (3, 4, 6, 3)]
    written, _ = _write(prefix, media="pixels", text_kind="ids", shapes=shapes)
    ds = LatentVideoDataset(prefix)
    raw = LatentVideoDataset(prefix, raw_pixels=True)
    for i, (m, t, _) in enumerate(written):
        assert np.array_equal(raw[i]["pixels"].permute(1, 2, 3, 0).numpy(), m)
        px = ds[i]["pixels"]
        assert px.dtype == torch.float32 and px.shape == (3,) + m.shape[:3]
        assert torch.allclose(px, torch.from_numpy(m).permute(3, 0, 1, 2).float() / 127.5 - 1)
        assert ds[i]["text"].dtype == torch.int64 and ds[i]["text"].tolist() == t.tolist()
    assert ds.bucket_keys() == [(3, 4, 6), (1, 4, 6), (3, 4, 6)]
    assert ds.text_lengths().tolist() == [1, 2, 3]


def test_collate_pads_text_with_mask(tmp_path):
    prefix = str(tmp_path / "ds")
    written, _ = _write(prefix, n=4)
    ds = LatentVideoDataset(prefix)
    batch = collate_video_text([ds[i] for i in range(4)])
    assert batch["latents"].shape == (4, 4, 3, 2, 5)
    assert batch["text"].shape == (4, 4, 6) and batch["text_mask"].tolist() == [
        [True, False, False, False], [True, True, False, False], [True, True, True, False], [True] * 4]
    assert (batch["text"][0, 1:] == 0).all() and batch["text_len"].tolist() == [1, 2, 3, 4]
    # mixed shapes in one micro-batch are an error that names the fix
    prefix2 = str(tmp_path / "mixed")
    _write(prefix2, shapes=[(4, 3, 2, 5), (4, 1, 2, 5)])
    ds2 = LatentVideoDataset(prefix2)
    with pytest.raises(ValueError, match="one shape at a time"):
        collate_video_text([ds2[0], ds2[1]])


def test_merge_concatenates_in_order(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    wa, _ = _write(a, n=3, seed=0)
    wb, _ = _write(b, n=2, seed=50)
    out = str(tmp_path / "ab")
    manifest = indexed.merge_datasets([a, b], out)
    assert manifest["num_samples"] == 5 and manifest["num_rejects"] == 2
    ds = LatentVideoDataset(out)
    for i, (m, t, meta) in enumerate(wa + wb):
        assert np.array_equal(_bits(ds[i]["latents"]), _bits(m)) and ds[i]["meta"] == meta
    with open(indexed.captions_path(out)) as f:
        assert [json.loads(line)["index"] for line in f] == list(range(5))
    indexed.verify_dataset(out)
    # data sets made differently do not merge
    c = str(tmp_path / "c")
    _write(c, media="pixels", text_kind="ids", n=1)
    with pytest.raises(indexed.DatasetError, match="differ"):
        indexed.merge_datasets([a, c], str(tmp_path / "ac"))


def test_verify_catches_corruption(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix)
    indexed.verify_dataset(prefix)
    bin_path = prefix + "_latents.bin"
    with open(bin_path, "r+b") as f:  # cut the last sample short
        f.truncate(os.path.getsize(bin_path) - 2)
    with pytest.raises(indexed.DatasetError, match="latents: .bin is"):
        indexed.verify_dataset(prefix)

    prefix2 = str(tmp_path / "ds2")
    _write(prefix2)
    with open(prefix2 + ".json") as f:
        manifest = json.load(f)
    manifest["num_samples"] = 7
    with open(prefix2 + ".json", "w") as f:
        json.dump(manifest, f)
    with pytest.raises(indexed.DatasetError, match="holds 5 sequences"):
        indexed.verify_dataset(prefix2)
    with pytest.raises(indexed.DatasetError, match="does not exist"):
        indexed.verify_dataset(str(tmp_path / "nothing"))


def test_writer_exposes_nothing_until_commit(tmp_path):
    prefix = str(tmp_path / "ds")
    fields = indexed.make_schema("pixels", "uint8", "ids", None)
    with pytest.raises(RuntimeError):
        with indexed.DatasetWriter(prefix, fields) as w:
            w.add(np.zeros((1, 2, 2, 3), np.uint8), np.ones(3, np.int32), {"caption": "x"})
            assert not indexed.is_complete(prefix)
            raise RuntimeError("crash before commit")
    assert os.listdir(tmp_path) == []  # temporaries removed, no visible files


def test_empty_dataset_is_valid(tmp_path):
    prefix = str(tmp_path / "empty")
    with indexed.DatasetWriter(prefix, indexed.make_schema("pixels", "uint8", "ids", None)) as w:
        w.add_reject({"source": "x.mp4", "reason": "empty file (0 bytes)"})
        w.commit({})
    assert indexed.verify_dataset(prefix)["num_samples"] == 0
    assert len(LatentVideoDataset(prefix)) == 0
