"""The moving-digits toy data set: real mp4 files, deterministic, labels consistent with captions and motion."""

import json

import av
import numpy as np
import pytest
import torch

from megatron_apt.data.toy import DIRECTIONS, ToyConfig, caption_for, make_toy_dataset, render_sample, _digits


def _read(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return np.stack(frames), s.codec_context.name, s.codec_context.pix_fmt, s.average_rate


def test_writes_mp4_and_captions_with_labels(tmp_path):
    meta = make_toy_dataset(tmp_path, num=6, seed=3)
    records = [json.loads(line) for line in meta.read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        frames, codec, pix_fmt, rate = _read(tmp_path / r["path"])
        assert frames.shape == (16, 32, 32, 3) and codec in ("h264", "mpeg4") and pix_fmt == "yuv420p" and rate == 8
        caption = (tmp_path / r["path"]).with_suffix(".txt").read_text().strip()
        assert caption == r["caption"] == caption_for(r["digits"], r["directions"])
        assert 1 <= len(r["digits"]) <= 2 and all(d in DIRECTIONS for d in r["directions"])
        assert frames.mean() < 100  # dark canvas


def test_deterministic_with_seed(tmp_path):
    a = make_toy_dataset(tmp_path / "a", num=3, seed=11)
    b = make_toy_dataset(tmp_path / "b", num=3, seed=11)
    c = make_toy_dataset(tmp_path / "c", num=3, seed=12)
    assert a.read_text() == b.read_text() != c.read_text()
    for i in range(3):
        fa, fb = _read(tmp_path / "a" / f"toy_{i:05d}.mp4")[0], _read(tmp_path / "b" / f"toy_{i:05d}.mp4")[0]
        assert np.array_equal(fa, fb)


@pytest.mark.parametrize("seed", range(8))
def test_single_digit_moves_in_the_labelled_direction(seed):
    images, targets = _digits()
    cfg = ToyConfig(max_digits=1, seed=seed)
    frames, labels = render_sample(np.random.default_rng(seed), images, targets, cfg)
    g = frames[..., 0].astype(np.float64)
    g = g - np.median(g)  # remove the background level
    g[g < 40] = 0
    ys, xs = np.mgrid[: g.shape[1], : g.shape[2]]
    cx = [(f * xs).sum() / f.sum() for f in g]
    cy = [(f * ys).sum() / f.sum() for f in g]
    dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
    want = labels["directions"][0]
    got = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    assert got == want and max(abs(dx), abs(dy)) > 5


def test_images_mode(tmp_path):
    meta = make_toy_dataset(tmp_path, num=4, images=True, seed=1)
    for r in map(json.loads, meta.read_text().splitlines()):
        assert r["path"].endswith(".png") and r["directions"] is None
        assert "moving" not in r["caption"] and r["caption"].startswith("the digit")


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_digits"):
        make_toy_dataset(tmp_path, num=1, max_digits=3)
    with pytest.raises(ValueError, match="min_digit"):
        make_toy_dataset(tmp_path, num=1, size=10)


def test_indexed_toy_set_matches_the_renderer_and_reads_like_preprocessed_data(tmp_path):
    from megatron_apt.data.dataset import LatentVideoDataset
    from megatron_apt.data.toy import render_arrays, write_toy_indexed

    cfg = ToyConfig(num=5, size=24, frames=4, fps=4, min_digit=8, max_digit=10, max_digits=1, seed=7)
    write_toy_indexed(tmp_path / "v", cfg)
    ds = LatentVideoDataset(tmp_path / "v")
    frames, labels = render_arrays(cfg)
    assert len(ds) == 5 and ds.text_kind == "ids"
    for i in range(5):
        s = ds[i]
        assert s["caption"] == labels[i]["caption"]
        assert bytes(int(t) - 1 for t in s["text"]).decode() == labels[i]["caption"]  # byte tokens
        got = s["pixels"].add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        assert np.array_equal(got, frames[i])
    # the chunked, multi-process drawing does not depend on the worker count
    big = ToyConfig(num=4100, size=24, frames=1, images=True, min_digit=8, max_digit=10, max_digits=1, seed=3)
    a, la = render_arrays(big, workers=1)
    b, lb = render_arrays(big, workers=2)
    assert np.array_equal(a, b) and la == lb


def test_indexed_toy_set_cli_needs_an_output(tmp_path):
    from megatron_apt.data.toy import main

    with pytest.raises(SystemExit):
        main(["--num", "2"])
    assert main(["--indexed", str(tmp_path / "i"), "--num", "3", "--images", "--size", "24"]) == 0
    assert (tmp_path / "i.json").is_file()
