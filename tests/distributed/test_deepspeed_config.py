"""parallel.deepspeed_config on built DeepSpeed engines (debug preset, CPU): a user JSON changes the engine's
ZeRO settings (seen on the engine and on how ZeRO-3 partitioned the parameters), a contradicting one stops the
trainer before any model is built, and the shipped ZeRO-Offload file trains to the same losses."""

import json
import os
from pathlib import Path

import pytest

from tests.helpers.ranks import run_distributed, save_debug_models, train_worker

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["stage=flow", "data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "data.synthetic_size=16",
          "precision=fp32", "parallel.engine=deepspeed", "parallel.zero_persistence_threshold=0", "global_batch=4",
          "micro_batch=2", "plots=false"]


def _engine(rank, world, overrides):
    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.trainer import Trainer

    try:
        t = Trainer(load_config(None, overrides))
    except ValueError as e:
        return {"error": str(e)}
    e = t.method.engines()["model"].engine
    return {"prefetch": e.zero_prefetch_bucket_size(), "persistence": e.zero_param_persistence_threshold(),
            "reduce": e.zero_reduce_bucket_size(),
            # ZeRO-3 keeps parameters of at most the threshold's size whole on every rank
            "persistent": sorted({p.ds_numel for p in e.module.parameters() if p.ds_persist}),
            "sizes": sorted({p.ds_numel for p in e.module.parameters()}), "describe": t.describe()}


def test_user_json_reaches_the_engine_and_contradictions_stop_the_trainer(tmp_path):
    user = tmp_path / "tuned.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 12345, "reduce_bucket_size": 4321,
                                                      "stage3_param_persistence_threshold": 100}}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    base = COMMON + [f"run_dir={tmp_path / 'r'}"]
    plain, tuned, refused = (run_distributed(_engine, 1, base + extra)[0] for extra in (
        [], [f"parallel.deepspeed_config={user}"], [f"parallel.deepspeed_config={bad}"]))
    assert (plain["prefetch"], plain["reduce"], plain["persistence"], plain["persistent"]) == (
        50_000_000, 500_000_000, 0, [])
    assert (tuned["prefetch"], tuned["reduce"], tuned["persistence"]) == (12345, 4321, 100)
    assert tuned["persistent"] == [n for n in tuned["sizes"] if n <= 100] and tuned["persistent"]
    assert f"DeepSpeed config {user} merged over the trainer's: zero_optimization." in tuned["describe"]
    assert "stage3_prefetch_bucket_size=12345" in tuned["describe"]
    assert refused["error"] == (f"parallel.deepspeed_config {bad}: gradient_accumulation_steps is 4 in the file but "
                                "the trainer sets 1 (the trainer accumulates micro-batches itself (exact global "
                                "batch)); remove it from the file or change the training config")


def test_shipped_offload_config_trains_the_same_losses(tmp_path):
    offload = ROOT / "examples" / "ds_configs" / "zero3_offload_optimizer.json"
    run = COMMON + ["steps=2"]
    ref = run_distributed(train_worker, 1, run + [f"run_dir={tmp_path / 'ref'}"])[0]
    off = run_distributed(train_worker, 1, run + [f"run_dir={tmp_path / 'off'}",
                                                  f"parallel.deepspeed_config={offload}"])[0]
    assert [h["loss"] for h in off] == [h["loss"] for h in ref]
    assert (tmp_path / "off" / "export" / "model_ema" / "model.safetensors").is_file()


def _leaves(rank, world, overrides):
    from deepspeed.utils import z3_leaf_module

    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.trainer import Trainer

    t = Trainer(load_config(None, overrides))
    return {name: [z3_leaf_module(b) for b in eng.module.modules() if type(b).__name__ == "MMDiTBlock"]
            for name, eng in t.method.engines().items()}


def test_zero3_gathers_whole_blocks_except_in_the_discriminator(tmp_path):
    """parallel.zero3_leaf_blocks: G's blocks are DeepSpeed leaves (one gather per block); D's are not (its
    frozen pass in G's update would fire the leaves' gradient-reduction hooks); off, no block is."""
    debug_models = save_debug_models(tmp_path / "models")
    base = ["stage=apt_image", "data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "data.synthetic_size=16",
            "precision=fp32", "parallel.engine=deepspeed", "global_batch=2", "micro_batch=2", "plots=false",
            f"model.init={debug_models}/cd", f"model.teacher={debug_models}/diff", f"run_dir={tmp_path / 'r'}"]
    on, off = (run_distributed(_leaves, 1, base + [f"parallel.zero3_leaf_blocks={v}"])[0] for v in ("true", "false"))
    assert on["G"] and all(on["G"]) and on["D"] and not any(on["D"])
    assert not any(off["G"]) and not any(off["D"])
