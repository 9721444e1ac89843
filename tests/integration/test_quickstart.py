"""A shortened quickstart (QUICK=1: a few steps per stage) end to end, as the README runs it."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_quickstart_runs_end_to_end(tmp_path):
    run = tmp_path / "qs"
    env = {**os.environ, "QUICK": "1", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), str(run)], capture_output=True, text=True,
                       env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"run folder: {run}" in r.stdout
    mp4s = sorted((run / "samples" / "apt_1step").glob("*.mp4"))
    assert len(mp4s) == 8 and (run / "samples" / "apt_1step" / "grid.png").is_file()
    from megatron_apt.inference.video import read_mp4

    frames = read_mp4(mp4s[0])
    assert frames.shape == (8, 24, 24, 3)
    report = (run / "report" / "report.md").read_text()
    for stage in ("cd", "apt_image", "apt_image_no_r1", "apt_video"):  # tools/plot_run.py and the trainer's plots
        assert {p.name for p in (run / stage / "plots").glob("*.png")} >= {"losses.png", "grad_norm.png",
                                                                          "throughput.png", "memory.png"}, stage
    assert {p.name for p in (run / "apt_image" / "plots").glob("*.png")} >= {"logit_gap.png", "ar1.png"}
    assert "## Training curves" in report and "](plots/training_apt_video/logit_gap.png)" in report
    for link in [x.split("](", 1)[1].rstrip(")") for x in report.splitlines() if x.startswith("![")]:
        assert (run / "report" / link).is_file(), link  # every embedded image exists
    # the report scores the shipped one-step generator beside the run's own models
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert "shipped_apt1" in json.dumps(metrics) and "shipped_apt1" in report
    for stage in ("cd", "apt_image", "apt_image_no_r1", "apt_video"):
        lines = (run / stage / "metrics.jsonl").read_text().splitlines()
        assert lines and all(json.loads(x)["finite"] for x in lines), stage
