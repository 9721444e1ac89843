"""What a run prints and records besides metrics.jsonl: only rank 0 logs (2 gloo ranks, unless
log_all_ranks), wandb in offline mode keeps one run id across a resume and receives the sample grids and
clips every sample_every steps, and the plots are written at the end of training."""

import os
import re
import sys

import pytest

from tests.helpers.ranks import run_distributed, train_worker

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytestmark = pytest.mark.distributed

COMMON = ["stage=flow", "data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "data.synthetic_size=16",
          "precision=fp32", "parallel.zero_persistence_threshold=0", "global_batch=4", "micro_batch=2", "steps=2"]
OURS = re.compile(r"^\[\d\d:\d\d:\d\d( rank \d+)? megatron_apt\.", re.M)  # the package logger's lines


def _captured(rank, world, overrides, out):
    """Train with this rank's stdout and stderr (file descriptors: libraries' output too) sent to a file."""
    path = os.path.join(out, f"rank{rank}.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        train_worker(rank, world, overrides)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    with open(path) as f:
        return f.read()


def test_only_rank_zero_logs_unless_asked(tmp_path):
    run = COMMON + ["parallel.engine=deepspeed", f"run_dir={tmp_path / 'run'}", "plots=false"]
    r0, r1 = run_distributed(_captured, 2, run, str(tmp_path))
    assert "[flow] step      1/2 loss" in r0 and "[flow] step      2/2 loss" in r0
    assert "saved checkpoint" in r0 and "attention auto -> " in r0 and " rank 0 megatron_apt.trainer]" in r0
    assert not OURS.search(r1), r1  # rank 1: no INFO line of ours ...
    assert "[INFO]" not in r1 and "step      1/2" not in r1  # ... nor DeepSpeed's
    r0, r1 = run_distributed(_captured, 2, run + ["log_all_ranks=true", f"run_dir={tmp_path / 'all'}"],
                             str(tmp_path))
    assert re.search(r"^\[\d\d:\d\d:\d\d rank 1 megatron_apt\.parallel\] process groups", r1, re.M), r1
    assert "[flow] step      2/2" in r0 and "[flow] step" not in r1  # the status line stays rank 0's


def test_wandb_offline_resume_keeps_the_run_id_and_gets_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    base = COMMON + ["parallel.engine=torch", f"run_dir={run}", "wandb_project=megatron-apt-test", "sample_every=1",
                     "data.synthetic_shape=[4,2,8,8]"]
    run_distributed(train_worker, 1, base)
    run_id = (run / "wandb_run_id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{8}", run_id)
    rest = run_distributed(train_worker, 1, base + ["steps=3"])[0]
    assert [h["step"] for h in rest] == [3]  # resumed from step 2
    assert (run / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs)  # one run, continued
    assert all((p / f"run-{run_id}.wandb").is_file() for p in runs)
    first, second = runs
    grids = sorted(p.name.split("_")[1] for p in (first / "files" / "media" / "images" / "samples").glob("grid_*.png"))
    assert grids == ["1", "2"] and len(list((first / "files" / "media" / "videos" / "samples").glob("*.mp4"))) == 2
    assert [p.name.split("_")[1] for p in (second / "files" / "media" / "images" / "samples").glob("grid_*")] == ["3"]
    # the plots at the end of each part, on disk and in wandb
    assert {p.name for p in (run / "plots").glob("*.png")} == {"losses.png", "grad_norm.png", "throughput.png",
                                                               "memory.png"}
    assert len(list((second / "files" / "media" / "images" / "plots").glob("losses_*.png"))) == 1
