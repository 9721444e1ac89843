"""Checkpoints that fit: the last `keep_checkpoints` are kept, a save that would not fit the disk stops the run
with a clear message before anything is written, and the previous checkpoint stays intact."""

import hashlib

import pytest
import torch

from tests.helpers.ranks import run_distributed

COMMON = ["data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "data.synthetic_size=8", "precision=fp32",
          "stage=flow", "parallel.engine=torch", "global_batch=2", "micro_batch=2", "log_every=1", "save_every=1"]


def _run(rank, world, run, steps, keep, full_disk):
    from megatron_apt.checkpoint import integrity, training
    from megatron_apt.checkpoint.integrity import CheckpointError
    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.trainer import Trainer

    if full_disk:
        training._free_bytes = lambda path: 1 << 20  # 1 MiB left
    out = {}
    try:
        Trainer(load_config(None, COMMON + [f"run_dir={run}", f"steps={steps}", f"keep_checkpoints={keep}"])).train()
    except CheckpointError as e:
        out["error"] = str(e)
    ck = integrity.step_dirs(f"{run}/checkpoints")
    out["steps"] = [p.name for p in ck]
    out["intact"] = [integrity.verify_checkpoint(p)["step"] for p in ck]
    out["partial"] = sorted(p.name for p in (ck[0].parent if ck else __import__("pathlib").Path(run)).glob(".*"))
    return out


@pytest.mark.distributed
def test_the_last_k_checkpoints_are_kept(tmp_path):
    r = run_distributed(_run, 1, str(tmp_path / "r"), 5, 2, False)[0]
    assert r["steps"] == ["step-00000004", "step-00000005"] and r["intact"] == [4, 5] and "error" not in r


@pytest.mark.distributed
def test_a_full_disk_stops_before_writing_and_keeps_the_previous_checkpoint(tmp_path):
    run = str(tmp_path / "r")
    first = run_distributed(_run, 1, run, 2, 2, False)[0]
    assert first["steps"] == ["step-00000001", "step-00000002"]
    full = run_distributed(_run, 1, run, 4, 2, True)[0]
    msg = full["error"]
    assert "not enough free space" in msg and "step-00000003" in msg and "step-00000002 is intact" in msg
    assert "\n" not in msg
    assert full["steps"] == ["step-00000001", "step-00000002"] and full["intact"] == [1, 2]
    assert not full["partial"]  # nothing half-written


def _run_export(rank, world, run, save_final, full_disk):
    from pathlib import Path

    from megatron_apt.checkpoint import integrity, training
    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.trainer import Trainer

    if full_disk:  # the checkpoint fits (the real disk); the export folder sees 1 MiB
        real = training._free_bytes
        training._free_bytes = lambda path: (1 << 20) if Path(path).name == "export" else real(path)
    out = {}
    try:
        Trainer(load_config(None, COMMON + [f"run_dir={run}", "steps=2", "save_every=0",
                                            f"save_final={str(save_final).lower()}"])).train()
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["steps"] = [p.name for p in integrity.step_dirs(f"{run}/checkpoints")]
    out["export"] = sorted(p.name for p in Path(run, "export").glob("*")) if Path(run, "export").exists() else None
    return out


@pytest.mark.distributed
def test_a_full_disk_refuses_the_export_on_every_rank_and_keeps_the_checkpoint(tmp_path):
    run = str(tmp_path / "r")
    r = run_distributed(_run_export, 2, run, True, True)
    for o in r:  # both ranks stop with the same message (no rank left waiting in a gather)
        assert o["error"].startswith("NotEnoughSpaceError: not enough free space") and "\n" not in o["error"]
        assert "nothing was exported" in o["error"] and "step-00000002" in o["error"]
        assert o["steps"] == ["step-00000002"] and o["export"] in (None, [])


@pytest.mark.distributed
def test_save_final_false_writes_no_checkpoint_and_no_export(tmp_path):
    r = run_distributed(_run_export, 1, str(tmp_path / "r"), False, False)[0]
    assert "error" not in r and r["steps"] == [] and r["export"] is None


def _run_async(rank, world, run, async_save, fail_at_step):
    from pathlib import Path

    from safetensors.torch import load_file

    from megatron_apt.checkpoint import integrity, training
    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.trainer import Trainer

    if fail_at_step:  # the background write of that step fails on this rank (a disk error, say)
        real = training.save_file

        def failing(tensors, path):
            if f"step-{fail_at_step:08d}" in path:
                raise OSError(f"simulated write error for {path}")
            return real(tensors, path)

        training.save_file = failing
    out = {}
    try:
        Trainer(load_config(None, COMMON + [f"run_dir={run}", "steps=4", "keep_checkpoints=2",
                                            f"async_save={str(async_save).lower()}"])).train()
    except OSError as e:
        out["error"] = str(e)
    ck = integrity.step_dirs(f"{run}/checkpoints")
    out["steps"] = [p.name for p in ck]
    out["intact"] = [integrity.verify_checkpoint(p)["step"] for p in ck]

    def digests(path):  # per tensor, a hash of its bytes (tensors themselves do not travel back from a rank)
        return {k: hashlib.sha256(v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                for k, v in load_file(str(path)).items()}

    out["tensors"] = {p.name: digests(p / f"rank{rank:05d}.safetensors") for p in ck}
    model = Path(run, "export", "model", "model.safetensors")
    out["export"] = digests(model) if model.exists() else None
    return out


@pytest.mark.distributed
def test_a_background_save_writes_the_same_checkpoints_as_a_blocking_one(tmp_path):
    sync = run_distributed(_run_async, 2, str(tmp_path / "sync"), False, 0)
    bg = run_distributed(_run_async, 2, str(tmp_path / "bg"), True, 0)
    for a, b in zip(sync, bg):  # per rank: the same steps kept, intact, bit-identical (a snapshot, not live views)
        assert "error" not in b and a["steps"] == b["steps"] == ["step-00000003", "step-00000004"]
        assert b["intact"] == [3, 4]
        assert a["tensors"] == b["tensors"] and a["export"] == b["export"] and a["export"]


@pytest.mark.distributed
def test_a_failed_background_save_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path):
    out = run_distributed(_run_async, 1, str(tmp_path / "r"), True, 3)[0]
    assert out["error"].startswith("simulated write error") and "step-00000003" in out["error"]
    assert out["steps"] == ["step-00000001", "step-00000002"] and out["intact"] == [1, 2]  # no step-3, no later
