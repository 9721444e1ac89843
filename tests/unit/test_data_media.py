"""Source media reading: argument parsing, input listing, geometry, image modes, fps resampling, clip placement."""

import json
import subprocess
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from megatron_apt.data.media import (
    ClipSpec,
    InputError,
    InputItem,
    cover_geometry,
    decode_item,
    image_to_rgb,
    list_inputs,
    parse_fps,
    parse_resolution,
    plan_clip_starts,
)
from tests.helpers.fixtures import coded_frames, read_code, write_video


def _nearest(t: Fraction, src_fps: Fraction, n_src: int) -> int:
    """Reference: index of the source frame nearest to time t (ties go to the earlier frame)."""
    best = min(range(n_src), key=lambda i: (abs(Fraction(i) / src_fps - t), i))
    return best


def _video_item(path, caption="x"):
    return InputItem(index=0, path=str(path), source=path.name, kind="video", caption=caption)


def test_parse_resolution_and_fps():
    assert parse_resolution("1280x720") == (1280, 720)
    assert parse_resolution("32X48") == (32, 48)
    for bad in ("1280", "1280x", "axb", "0x10", "12x-3", "1x2x3"):
        with pytest.raises(InputError, match="--resolution"):
            parse_resolution(bad)
    assert parse_fps("30000/1001") == Fraction(30000, 1001)
    assert parse_fps(24) == 24
    for bad in ("0", "-1", "fast"):
        with pytest.raises(InputError, match="--fps"):
            parse_fps(bad)


def test_cover_geometry_landscape_vertical_and_odd():
    # landscape source into landscape target: short side matched, width cropped
    assert cover_geometry(1920, 1080, 1280, 720) == (1280, 720, 0, 0)
    assert cover_geometry(640, 360, 32, 32) == (57, 32, 12, 0)
    # vertical source into landscape target: width matched, top and bottom cropped
    rw, rh, x0, y0 = cover_geometry(720, 1280, 1280, 720)
    assert (rw, x0) == (1280, 0) and rh == 2276 and y0 == (2276 - 720) // 2
    # odd sizes are fine
    rw, rh, x0, y0 = cover_geometry(45, 33, 32, 24)
    assert rw >= 32 and rh >= 24 and x0 + 32 <= rw and y0 + 24 <= rh


def test_image_modes_become_rgb():
    gray = Image.fromarray(np.full((5, 7), 100, np.uint8))
    assert image_to_rgb(gray).shape == (5, 7, 3) and (image_to_rgb(gray) == 100).all()
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [[0, 255, 128, 64]] * 4
    out = image_to_rgb(Image.fromarray(rgba))
    assert out.shape == (4, 4, 3)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 200 and out[0, 2, 0] == round(200 * 128 / 255)  # over black
    sixteen = Image.fromarray(np.full((3, 3), 65535, np.uint16))
    assert (image_to_rgb(sixteen) == 255).all()
    la = Image.fromarray(np.full((2, 2), 255, np.uint8)).convert("LA")
    assert image_to_rgb(la).shape == (2, 2, 3)
    pal = Image.fromarray(np.full((3, 3, 3), 50, np.uint8)).convert("P")
    assert image_to_rgb(pal).shape == (3, 3, 3)


def test_list_inputs_folder_csv_jsonl(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("a.mp4", "b/c.png", "z.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.txt").write_text("cap a")
    (tmp_path / "notes.md").write_text("not media")
    items = list_inputs(tmp_path)
    assert [it.source for it in items] == ["a.mp4", "b/c.png", "z.jpg"]
    assert [it.kind for it in items] == ["video", "image", "image"]
    assert [it.index for it in items] == [0, 1, 2]

    csv_path = tmp_path / "list.csv"
    csv_path.write_text('path,caption,label\na.mp4,"a cat, running",1\nnope.xyz,bad,2\n,empty path,3\n')
    items = list_inputs(csv_path)
    assert items[0].caption == "a cat, running" and items[0].extra == {"label": "1"}
    assert items[0].path == str(tmp_path / "a.mp4")
    assert "unsupported file type" in items[1].error and items[2].error == "missing path"

    jl = tmp_path / "list.jsonl"
    jl.write_text(json.dumps({"path": "z.jpg", "caption": "zed", "digits": [3]}) + "\n{not json\n")
    items = list_inputs(jl)
    assert items[0].caption == "zed" and items[0].extra == {"digits": [3]}
    assert "invalid JSON" in items[1].error

    with pytest.raises(InputError, match="does not exist"):
        list_inputs(tmp_path / "missing")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,text\na.mp4,x\n")
    with pytest.raises(InputError, match="'path' and 'caption'"):
        list_inputs(bad_csv)


def test_plan_clip_starts_spreads_clips():
    spec = ClipSpec(8, 8, Fraction(10), 5, clips_per_video=3)  # 0.5 s clips
    assert plan_clip_starts(Fraction(3), spec) == [0, Fraction(5, 4), Fraction(5, 2)]
    assert plan_clip_starts(Fraction(1), spec) == [0, Fraction(1, 2)]  # room for 2 only
    assert plan_clip_starts(Fraction(2, 5), spec) == []  # shorter than one clip
    assert plan_clip_starts(None, spec) == [0, Fraction(1, 2), 1]  # unknown duration: back to back


@pytest.mark.parametrize("src_fps,dst_fps", [(30, 12), (25, 24), (8, 24)])
def test_fps_resampling_picks_nearest_source_frame(tmp_path, src_fps, dst_fps):
    n_src = int(src_fps * 2)  # 2 s of video
    path = write_video(tmp_path / "coded.mp4", coded_frames(n_src), src_fps)
    frames = int(dst_fps * 1.5)
    res = decode_item(_video_item(tmp_path / "coded.mp4"), ClipSpec(64, 64, Fraction(dst_fps), frames))
    assert not res.rejects, res.rejects
    got = [read_code(f) for f in res.clips[0].frames]
    want = [_nearest(Fraction(k, dst_fps), Fraction(src_fps), n_src) for k in range(frames)]
    assert got == want
    assert path.endswith("coded.mp4")


def test_clips_per_video_are_spread_and_exact(tmp_path):
    write_video(tmp_path / "long.mp4", coded_frames(90), 30)  # 3 s
    spec = ClipSpec(64, 64, Fraction(10), 5, clips_per_video=3)
    res = decode_item(_video_item(tmp_path / "long.mp4"), spec)
    assert not res.rejects and [c.clip_index for c in res.clips] == [0, 1, 2]
    assert [c.start for c in res.clips] == [0.0, 1.25, 2.5]
    for c in res.clips:
        start = Fraction(c.start).limit_denominator(100)
        want = [_nearest(start + Fraction(k, 10), Fraction(30), 90) for k in range(5)]
        assert [read_code(f) for f in c.frames] == want


def test_clip_longer_than_video_is_rejected_with_reason(tmp_path):
    write_video(tmp_path / "short.mp4", coded_frames(10), 10)  # 1 s
    res = decode_item(_video_item(tmp_path / "short.mp4"), ClipSpec(64, 64, Fraction(10), 11))
    assert res.clips == [] and "shorter than one clip" in res.rejects[0]["reason"]
    # exactly as long as the video: accepted, last frame is the last source frame
    res = decode_item(_video_item(tmp_path / "short.mp4"), ClipSpec(64, 64, Fraction(10), 10))
    assert not res.rejects and [read_code(f) for f in res.clips[0].frames] == list(range(10))


def test_vertical_video_is_cropped_not_squashed(tmp_path):
    frames = np.zeros((6, 80, 48, 3), np.uint8)
    frames[:, 32:48, :, :] = 255  # a horizontal white band in the middle third
    write_video(tmp_path / "v.mp4", frames, 6)
    res = decode_item(_video_item(tmp_path / "v.mp4"), ClipSpec(48, 48, Fraction(6), 6))
    f = res.clips[0].frames[0]
    assert f.shape == (48, 48, 3)
    # centre crop keeps rows 16..64 of the source: the band sits at rows 16..32 of the output
    assert f[20:28].mean() > 200 and f[:12].mean() < 40 and f[36:].mean() < 40


def test_rotation_metadata_is_applied(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="needs an ffmpeg binary to write rotation metadata")
    frames = np.zeros((4, 48, 64, 3), np.uint8)
    frames[:, :16, :16] = 255  # top-left block
    write_video(tmp_path / "src.mp4", frames, 4)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", "90", "-i",
                    str(tmp_path / "src.mp4"), "-c", "copy", str(tmp_path / "rot.mp4")], check=True)
    res = decode_item(_video_item(tmp_path / "rot.mp4"), ClipSpec(48, 64, Fraction(4), 2))
    f = res.clips[0].frames[0]
    assert f.shape == (64, 48, 3)  # displayed as portrait
    assert f[-16:, :16].mean() > 200 and f[:16, :16].mean() < 40  # 90 degrees counter-clockwise


def test_image_is_one_frame_clip_and_caption_file_is_read(tmp_path):
    Image.fromarray(np.full((30, 50), 77, np.uint8)).save(tmp_path / "g.png")
    (tmp_path / "g.txt").write_text("\ufeff  a gray square \n", encoding="utf-8")
    item = list_inputs(tmp_path)[0]
    res = decode_item(item, ClipSpec(16, 16, Fraction(24), 48))
    assert res.caption == "a gray square"
    assert res.clips[0].frames.shape == (1, 16, 16, 3) and (res.clips[0].frames == 77).all()
