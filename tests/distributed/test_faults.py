"""Faults on 2 gloo ranks: a non-finite step is skipped by every rank (torch and DeepSpeed engines), a run that
stays non-finite stops with exit status 3 and writes no non-finite weights, a damaged latest checkpoint (a
flipped bit, a truncated shard, a garbled header, a garbled or incomplete trainer.json, on any rank) makes
resume fall back to the previous one with a warning naming the file, all-damaged is a clear error, and
metrics.jsonl is strict JSON with each step once after a NaN step and after a kill and resume (which also
removes the interrupted export and checkpoint folders the kill left)."""

import importlib.util
import io
import json
import logging
import math
import os
import shutil
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.ranks import run_distributed

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["stage=flow", "data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "data.synthetic_size=32",
          "precision=fp32", "parallel.zero_persistence_threshold=0", "global_batch=4", "micro_batch=2", "log_every=1"]


def _strict_records(path):
    """metrics.jsonl read by a strict JSON parser (NaN / Infinity raise)."""
    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def _pretrain_main():
    spec = importlib.util.spec_from_file_location("pretrain_apt", ROOT / "pretrain_apt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


# ---- a NaN step ------------------------------------------------------------------------------------------
def _nan_at_step_3(rank, world, run, engine):
    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.trainer import Trainer

    tr = Trainer(load_config(None, COMMON + [f"parallel.engine={engine}", "steps=4", f"run_dir={run}"]))
    batches, step_fn = tr.micro_batches, tr.method.train_step

    def micro_batches(step):
        out = batches(step)
        if step == 2 and rank == 0:  # update 3: one rank's data turns NaN (the other rank's stays finite)
            for mb in out:
                mb["x"] = torch.full_like(mb["x"], float("nan"))
        return out

    states = []

    def train_step(step, mbs):
        metrics = step_fn(step, mbs)  # weights, optimizer state and EMA after the update
        states.append({k: v.detach().clone() for k, v in tr.method.engine.state_tensors().items()})
        return metrics

    tr.micro_batches, tr.method.train_step = micro_batches, train_step
    tr.train()
    same = [all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys() for a, b in zip(states, states[1:])]
    finite = all(bool(torch.isfinite(v).all()) for v in states[-1].values() if v.is_floating_point())
    return same, finite


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_a_nan_step_skips_its_update_on_every_rank(tmp_path, engine):
    res = run_distributed(_nan_at_step_3, 2, str(tmp_path / "run"), engine, timeout=600)
    for same, finite in res:  # updates 1->2 and 3->4 move the weights, update 3 leaves them (and the EMA) alone
        assert same == [False, True, False], same
        assert finite
    recs = _strict_records(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["skipped_update"] for r in recs] == [False, False, True, False]
    assert recs[2]["loss"] is None and "loss" in recs[2]["nonfinite"]
    assert all(isinstance(r["loss"], float) for i, r in enumerate(recs) if i != 2)
    exported = load_file(str(tmp_path / "run" / "export" / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in exported.values())


# ---- a run that stays non-finite ------------------------------------------------------------------------
def _diverging_run(rank, world, run, engine, how):
    from megatron_apt.trainer.trainer import Trainer

    batches = Trainer.micro_batches

    def micro_batches(self, step):
        out = batches(self, step)
        if how == "nan_loss" and step >= 1:  # every update after the first sees NaN data
            for mb in out:
                mb["x"] = torch.full_like(mb["x"], float("nan"))
        if how == "nan_weights" and step == 1:  # as if the first update had produced a NaN weight
            with torch.no_grad():
                next(self.method.engine.module.parameters()).view(-1)[0] = float("nan")
        return out

    Trainer.micro_batches = micro_batches
    err = io.StringIO()
    with redirect_stderr(err):
        rc = _pretrain_main()(COMMON + [f"parallel.engine={engine}", "steps=6", "save_every=1", "max_bad_steps=2",
                                        f"run_dir={run}"])
    return rc, err.getvalue()


@pytest.mark.parametrize("engine,how", [("torch", "nan_loss"), ("deepspeed", "nan_loss"), ("torch", "nan_weights")])
def test_a_run_that_stays_non_finite_stops_and_writes_no_non_finite_weights(tmp_path, engine, how):
    run = tmp_path / "run"
    rc, err = run_distributed(_diverging_run, 1, str(run), engine, how, timeout=600)[0]
    assert rc == 3, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    if how == "nan_loss":
        assert "stopped at step 3: 2 steps in a row had a non-finite loss or gradient norm" in errors[0]
    else:
        assert "the weights are not finite" in errors[0]
    assert not (run / "export").exists()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == (["step-00000001", "step-00000002"] if how == "nan_loss" else ["step-00000001"]), ckpts
    for f in (run / "checkpoints").rglob("*.safetensors"):
        for k, v in load_file(str(f)).items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), (f, k)
    recs = _strict_records(run / "metrics.jsonl")  # strict JSON after the NaN steps
    assert [r["step"] for r in recs] == ([1, 2, 3] if how == "nan_loss" else [1, 2])


# ---- damaged checkpoints, kill and resume ----------------------------------------------------------------
def _flip(f, offset):
    b = bytearray(f.read_bytes())
    b[offset:offset + 16] = bytes(x ^ 0xFF for x in b[offset:offset + 16])  # 16 flipped bytes
    f.write_bytes(bytes(b))


DAMAGE = {
    # case: (file in step-00000004, what is done to it)
    "bitflip": ("rank00001.safetensors", lambda f: _flip(f, f.stat().st_size - 64)),
    "truncated": ("rank00000.safetensors", lambda f: os.truncate(f, f.stat().st_size // 2)),
    "header": ("rank00001.safetensors", lambda f: _flip(f, 12)),  # inside the JSON header
    "meta_garbled": ("trainer.json", lambda f: f.write_text(f.read_text()[:-40])),
    "meta_no_step": ("trainer.json", lambda f: f.write_text(json.dumps(
        {k: v for k, v in json.loads(f.read_text()).items() if k != "step"}))),
}


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _damage_and_resume(rank, world, base):
    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.trainer import Trainer

    base = Path(base)
    cfg = COMMON + ["parallel.engine=torch", "steps=4", "save_every=2"]
    Trainer(load_config(None, cfg + [f"run_dir={base}/ref"])).train()
    ref4 = load_file(str(base / "ref/checkpoints/step-00000004" / f"rank{rank:05d}.safetensors"))
    cap = _Capture()
    for name in ("megatron_apt.trainer", "megatron_apt.checkpoint"):  # the run and its checkpoint store
        logging.getLogger(name).addHandler(cap)
    out = {}
    for case, (name, damage) in DAMAGE.items():
        run = base / case
        if rank == 0:
            shutil.copytree(base / "ref", run)
            damage(run / "checkpoints" / "step-00000004" / name)
        torch.distributed.barrier()
        cap.lines = []
        tr = Trainer(load_config(None, cfg + [f"run_dir={run}"]))
        if case == "bitflip":  # resume for real: steps 3 and 4 again, bit-identical to the undamaged run
            hist = tr.train()
            again = load_file(str(run / "checkpoints/step-00000004" / f"rank{rank:05d}.safetensors"))
            out[case] = {"steps": [h["step"] for h in hist], "identical": all(torch.equal(again[k], ref4[k]) for k in ref4),
                         "warnings": list(cap.lines)}
        else:
            out[case] = {"resumed": tr.resume().name, "step": tr.step, "warnings": list(cap.lines)}
        torch.distributed.barrier()
        out[case]["aside"] = (run / "checkpoints" / "step-00000004.damaged").is_dir()
    # every checkpoint damaged: a clear error and exit status 2 from the command line, nothing set aside
    run = base / "all"
    if rank == 0:
        shutil.copytree(base / "ref", run)
        for step in ("step-00000002", "step-00000004"):
            _flip(run / "checkpoints" / step / "rank00000.safetensors", 100)
    torch.distributed.barrier()
    err = io.StringIO()
    with redirect_stderr(err):
        rc = _pretrain_main()(cfg + [f"run_dir={run}"])
    out["all"] = {"rc": rc, "err": err.getvalue(), "dirs": sorted(p.name for p in (run / "checkpoints").iterdir())}
    # a kill after step 4 was logged but before its checkpoint was written: metrics hold steps 1-4 and a line
    # cut by the kill; the resume from step 2 logs 3 and 4 again, each step stays once
    run = base / "killed"
    if rank == 0:
        shutil.copytree(base / "ref", run)
        shutil.rmtree(run / "checkpoints" / "step-00000004")
        shutil.rmtree(run / "export")
        (run / "export" / ".model.x1y2.partial").mkdir(parents=True)  # an export the kill interrupted
        (run / "checkpoints" / ".step-00000004.partial").mkdir()  # and the checkpoint it was writing
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 5, "loss": 0.1')
    torch.distributed.barrier()
    hist = Trainer(load_config(None, cfg + [f"run_dir={run}"])).train()
    out["killed"] = {"steps": [h["step"] for h in hist], "left": sorted(
        p.name for p in [*(run / "export").iterdir(), *(run / "checkpoints").iterdir()] if p.name.startswith("."))}
    return out


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    return base, run_distributed(_damage_and_resume, 2, str(base), timeout=900)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_with_a_warning_naming_the_file(damaged, case):
    base, res = damaged
    name = DAMAGE[case][0]
    for r in res:
        if case == "bitflip":
            assert r[case]["steps"] == [3, 4] and r[case]["identical"], r[case]
        else:
            assert r[case]["resumed"] == "step-00000002" and r[case]["step"] == 2, r[case]
        assert r[case]["aside"]  # set aside as step-00000004.damaged, never preferred again
    # the rank that found the damage names the file; every rank falls back (rank 0's own files may be intact)
    warned = [w for r in res for w in r[case]["warnings"] if "step-00000004" in w and name in w]
    assert warned, [r[case]["warnings"] for r in res]
    assert any("resuming from" in w and "step-00000002" in w for w in res[0][case]["warnings"])


def test_every_checkpoint_damaged_is_a_clear_error(damaged):
    base, res = damaged
    for r in res:
        a = r["all"]
        assert a["rc"] == 2, a["err"]
        lines = [line for line in a["err"].splitlines() if line.startswith("error:")]  # (rank 0 also logs progress)
        assert len(lines) == 1 and lines[0].startswith("error: no intact checkpoint left"), a["err"]
        assert a["err"].rstrip().endswith(lines[0])  # the error is the last word
        assert "step-00000004" in lines[0] and "step-00000002" in lines[0]
        assert a["dirs"] == ["step-00000002", "step-00000004"]  # nothing set aside or removed


def test_metrics_are_strict_json_with_each_step_once_after_kill_and_resume(damaged):
    base, res = damaged
    assert res[0]["killed"]["steps"] == [3, 4]
    assert res[0]["killed"]["left"] == []  # the interrupted export and checkpoint folders were removed
    recs = _strict_records(base / "killed" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    ref = _strict_records(base / "ref" / "metrics.jsonl")
    assert [r["loss"] for r in recs] == [r["loss"] for r in ref]  # the resumed steps equal the uninterrupted run's
    assert all(math.isfinite(r["loss"]) for r in recs)
