"""tools/preprocess_video.py end to end on toy and broken data: outputs, rejects, kill-and-resume, sharding + merge,
clear errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_apt.data import indexed
from megatron_apt.data.dataset import LatentVideoDataset
from megatron_apt.data.preprocess import KILL_AFTER_ENV, RAISE_AFTER_ENV, build_parser, main, process
from tests.helpers.fixtures import make_bad_inputs
from megatron_apt.data.toy import make_toy_dataset

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "preprocess_video.py"
FIELDS = ("pixels", "shapes", "text", "textshape", "meta")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    make_toy_dataset(d, num=13, seed=5)
    return d


def _args(inp, out, *extra):
    return ["--input", str(inp), "--output", str(out), "--resolution", "32x32", "--fps", "8", "--frames", "16",
            "--workers", "0", "--no-progress", *extra]


def run(*argv):
    return process(build_parser().parse_args(list(argv)))


def _files_equal(a, b, fields=FIELDS):
    """Two data sets hold identical bytes in every field, caption file and reject file."""
    for name in fields:
        for ext in (".bin", ".idx"):
            pa, pb = f"{a}_{name}{ext}", f"{b}_{name}{ext}"
            assert Path(pa).read_bytes() == Path(pb).read_bytes(), (pa, pb)
    for side in (indexed.captions_path, indexed.rejects_path):
        assert Path(side(a)).read_text() == Path(side(b)).read_text()


def _captions(prefix):
    return [json.loads(line) for line in Path(indexed.captions_path(prefix)).read_text().splitlines()]


def _samples_by_key(prefix):
    """{(source, clip): (pixel bytes, text bytes, meta)} of a data set."""
    ds = LatentVideoDataset(prefix, raw_pixels=True)
    out = {}
    for i in range(len(ds)):
        s = ds[i]
        key = (s["meta"]["source"], s["meta"]["clip"])
        assert key not in out, f"duplicate sample {key}"
        out[key] = (s["pixels"].numpy().tobytes(), s["text"].numpy().tobytes(), s["meta"])
    return out


def test_toy_end_to_end_pixels_and_metadata(toy, tmp_path, capsys):
    stats = run(*_args(toy / "metadata.jsonl", tmp_path / "ds", "--verify"))
    assert (stats.inputs, stats.clips, stats.rejects) == (13, 13, 0)
    out = capsys.readouterr().out
    assert "samples       13" in out and "16x32x32x3: 13" in out
    m = indexed.read_manifest(tmp_path / "ds")
    assert m["num_samples"] == 13 and m["media"] == "pixels" and m["fps"] == 8 and m["frames"] == 16
    assert m["resolution"] == [32, 32] and m["settings"]["tokenizer"]["name"] == "byte"
    assert "megatron-core" in m["versions"]
    ds = LatentVideoDataset(tmp_path / "ds")
    s = ds[4]
    assert s["pixels"].shape == (3, 16, 32, 32) and -1 <= s["pixels"].min() and s["pixels"].max() <= 1
    labels = [json.loads(x) for x in (toy / "metadata.jsonl").read_text().splitlines()][4]
    assert s["caption"] == labels["caption"] and s["meta"]["extra"]["directions"] == labels["directions"]
    assert bytes(int(i) - 1 for i in s["text"]) == labels["caption"].encode()  # byte-level ids
    assert not Path(f"{tmp_path / 'ds'}.parts").exists()  # parts cleaned up


def test_bad_inputs_are_rejected_with_reasons_and_good_ones_kept(tmp_path):
    expected = make_bad_inputs(tmp_path / "in", fps=8, seconds=1.0)
    stats = run("--input", str(tmp_path / "in"), "--output", str(tmp_path / "ds"), "--resolution", "32x24",
                "--fps", "8", "--seconds", "1", "--workers", "0", "--no-progress", "--part-size", "4", "--verify")
    rejects = list(indexed.iter_rejects(tmp_path / "ds"))
    by_source = {r["source"]: r["reason"] for r in rejects}
    assert set(by_source) == set(expected["rejects"])
    for name, why in expected["rejects"].items():
        assert why in by_source[name], (name, by_source[name])
    samples = _samples_by_key(tmp_path / "ds")
    assert sorted(src for src, _ in samples) == expected["good"]
    for pix, _, meta in samples.values():
        frames = np.frombuffer(pix, np.uint8)
        assert frames.size == (1 if meta["kind"] == "image" else 8) * 24 * 32 * 3
    assert stats.rejects == len(expected["rejects"]) and stats.clips == len(expected["good"])


def test_csv_input_with_missing_files(tmp_path, toy):
    csv = tmp_path / "list.csv"
    csv.write_text(f"path,caption\n{toy}/toy_00000.mp4,first\nmissing.mp4,gone\n{toy}/toy_00001.mp4,\n")
    run(*_args(csv, tmp_path / "ds"))
    assert [m["caption"] for m in _captions(tmp_path / "ds")] == ["first"]
    reasons = {r["source"]: r["reason"] for r in indexed.iter_rejects(tmp_path / "ds")}
    assert "cannot read file" in reasons["missing.mp4"] and reasons[f"{toy}/toy_00001.mp4"] == "empty caption"


def test_interrupted_run_resumes_to_identical_output(toy, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    run(*_args(toy, ref, "--part-size", "3"))
    out = tmp_path / "ds"
    monkeypatch.setenv(RAISE_AFTER_ENV, "7")  # crash inside part 2 (samples 6..8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(*_args(toy, out, "--part-size", "3"))
    parts = sorted(p.name for p in Path(f"{out}.parts").iterdir() if p.name.startswith("part_"))
    assert parts == ["part_000000", "part_000001"] and not indexed.is_complete(out)
    monkeypatch.delenv(RAISE_AFTER_ENV)
    stats = run(*_args(toy, out, "--part-size", "3"))
    assert stats.parts_skipped == 2 and stats.parts_done == 3
    _files_equal(ref, out)
    indexed.verify_dataset(out)


def test_sigkill_then_resume_gives_the_same_data_set(toy, tmp_path):
    ref = tmp_path / "ref"
    run(*_args(toy, ref, "--part-size", "2"))
    out = tmp_path / "ds"
    env = {**os.environ, KILL_AFTER_ENV: "5", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(TOOL), *_args(toy, out, "--part-size", "2")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    parts_dir = Path(f"{out}.parts")
    assert sorted(p.name for p in parts_dir.glob("part_*")) == ["part_000000", "part_000001"]
    assert list(parts_dir.glob(".part_000002.*.partial"))  # the killed part was left behind, unfinished
    stats = run(*_args(toy, out, "--part-size", "2"))
    assert stats.parts_skipped == 2
    _files_equal(ref, out)


def test_finished_parts_are_removed_and_os_errors_are_one_line(toy, tmp_path, capsys):
    out = tmp_path / "ds"
    run(*_args(toy, out, "--keep-parts"))  # as a run killed after building its shard, before removing the parts
    assert Path(f"{out}.parts").is_dir()
    run(*_args(toy, out))  # the next run finds the shard complete and removes the leftover
    assert not Path(f"{out}.parts").exists() and indexed.is_complete(out)
    blocker = tmp_path / "file"  # a file where the output folder should go: fails for any user, root included
    blocker.write_text("x")
    capsys.readouterr()
    assert main(_args(toy, blocker / "ds")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(blocker) in lines[0], lines
    assert blocker.read_text() == "x"


def test_two_ranks_plus_merge_equal_one_rank(toy, tmp_path):
    single = tmp_path / "single"
    run(*_args(toy, single))
    out = tmp_path / "ds"
    run(*_args(toy, out, "--rank", "1", "--world-size", "2"))
    assert indexed.is_complete(f"{out}_rank1_of_2") and not indexed.is_complete(out)
    run(*_args(toy, out, "--rank", "0", "--world-size", "2", "--merge", "--verify"))  # rank 0 merges
    # Same samples with the same bytes; the order is rank-major (inputs 0,2,4,.. then 1,3,5,..).
    assert _samples_by_key(single) == _samples_by_key(out)
    order = [m["input_index"] for m in _captions(out)]
    assert order == list(range(0, 13, 2)) + list(range(1, 13, 2))
    shard0 = [m["input_index"] for m in _captions(f"{out}_rank0_of_2")]
    assert all(i % 2 == 0 for i in shard0)
    # the stand-alone merge step gives the same bytes
    run("--output", str(out), "--merge", "--overwrite")
    m = indexed.read_manifest(out)
    assert m["num_samples"] == 13 and m["world_size"] == 2 and m["shards"] == ["ds_rank0_of_2", "ds_rank1_of_2"]


def test_merge_refuses_missing_shards(toy, tmp_path, capsys):
    out = tmp_path / "ds"
    run(*_args(toy, out, "--rank", "2", "--world-size", "3"))
    with pytest.raises(SystemExit) as e:
        main(["--output", str(out), "--merge"])
    assert e.value.code == 2 and "shards of ranks [0, 1] (of 3) are missing" in capsys.readouterr().err


def test_decode_workers_give_identical_output(toy, tmp_path):
    run(*_args(toy, tmp_path / "a", "--part-size", "5"))
    run(*_args(toy, tmp_path / "b", "--part-size", "5", "--workers", "2"))
    _files_equal(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--input", "{tmp}/missing", "--output", "{tmp}/o", "--resolution", "32x32"],
         "--input '{tmp}/missing' does not exist"),
        (["--input", "{toy}", "--output", "{tmp}/o", "--resolution", "32by32"], "bad --resolution '32by32'"),
        (["--input", "{toy}", "--output", "{tmp}/o"], "--resolution is required"),
        (["--input", "{toy}", "--output", "{tmp}/o", "--resolution", "8x8", "--vae", "{tmp}/novae"],
         "--vae '{tmp}/novae' is not a directory"),
        (["--input", "{toy}", "--output", "{tmp}/o", "--resolution", "8x8", "--fps", "-2"], "bad --fps '-2'"),
        (["--input", "{toy}", "--output", "{tmp}", "--resolution", "8x8"], "is a directory"),
        (["--output", "{tmp}/o"], "nothing to do"),
        (["--output", "{tmp}/o", "--verify"], "does not exist"),
        (["--input", "{toy}", "--output", "{tmp}/o", "--resolution", "8x8", "--rank", "2", "--world-size", "2"],
         "bad rank/world size"),
    ],
)
def test_bad_flags_give_clear_errors(toy, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, toy=toy) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_changed_settings_are_not_mixed_into_existing_output(toy, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ds"
    monkeypatch.setenv(RAISE_AFTER_ENV, "2")
    with pytest.raises(RuntimeError):
        run(*_args(toy, out, "--part-size", "1"))
    monkeypatch.delenv(RAISE_AFTER_ENV)
    with pytest.raises(SystemExit):
        main(_args(toy, out, "--part-size", "1", "--max-text-len", "8"))
    assert "different settings (differs in: max_text_len)" in capsys.readouterr().err
    run(*_args(toy, out, "--part-size", "1", "--max-text-len", "8", "--overwrite"))
    assert indexed.read_manifest(out)["settings"]["max_text_len"] == 8
    with pytest.raises(SystemExit):
        main(_args(toy, out, "--part-size", "1"))
    assert "already exists and was made with different settings" in capsys.readouterr().err
