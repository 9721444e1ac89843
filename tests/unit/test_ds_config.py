"""A user's DeepSpeed JSON (parallel.deepspeed_config) merged over the config the trainer builds: tuning keys
go through, keys the trainer controls may only restate its values, and --dry-run prints the merged JSON.
(That the merged settings reach a built engine: tests/distributed/test_deepspeed_config.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_apt.trainer import ds_config as dc

ROOT = Path(__file__).resolve().parents[2]


def _built(**kw):
    args = dict(micro_batch=2, grad_clip=0.0, precision="bf16", zero_stage=3, persistence_threshold=100_000,
                overlap_comm=False)
    args.update(kw)
    return dc.trainer_ds_config(**args)


def test_tuning_keys_merge_and_nested_sections_keep_the_trainers_keys():
    user = {"zero_optimization": {"stage3_prefetch_bucket_size": 12345, "overlap_comm": True},
            "communication_data_type": "fp32", "_comment": "dropped", "bf16": {"enabled": True}}
    merged = dc.merged_config(_built(), dc._strip_doc(user), dp_size=4)
    z = merged["zero_optimization"]
    assert z["stage3_prefetch_bucket_size"] == 12345 and z["overlap_comm"] is True
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 100_000 and z["contiguous_gradients"]
    assert merged["communication_data_type"] == "fp32" and "_comment" not in merged
    assert merged["train_micro_batch_size_per_gpu"] == 2 and merged["managed_gradient_accumulation"] is False
    assert dc.changed_keys(_built(), merged) == ["zero_optimization.overlap_comm=true",
                                                  "zero_optimization.stage3_prefetch_bucket_size=12345",
                                                  "communication_data_type=\"fp32\""]


@pytest.mark.parametrize("user, key, have, want", [
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu", "4", "2 (micro_batch)"),
    ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps", "8", "1 (the trainer accumulates"),
    ({"train_batch_size": 9062}, "train_batch_size", "9062", "8 (micro_batch x 4 data-parallel ranks"),
    ({"managed_gradient_accumulation": True}, "managed_gradient_accumulation", "true", "false (the trainer"),
    ({"bf16": {"enabled": False}}, "bf16.enabled", "false", "true (precision and parallel.deepspeed_bf16)"),
    ({"fp16": {"enabled": True}}, "fp16.enabled", "true", "false (precision"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", "2", "3 (parallel.zero_stage)"),
    ({"gradient_clipping": 1.0}, "gradient_clipping", "1.0", "0.0 (optim.grad_clip)"),
])
def test_contradictions_name_the_key_and_both_values(user, key, have, want):
    with pytest.raises(ValueError) as e:
        dc.merged_config(_built(), user, dp_size=4, source="my.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"parallel.deepspeed_config my.json: {key} is {have} in the file")
    assert f"the trainer sets {want}" in msg


def test_restating_the_trainers_values_is_fine_and_sections_it_owns_are_refused():
    same = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 8,
            "managed_gradient_accumulation": False, "bf16": {"enabled": True}, "fp16": {"enabled": False},
            "zero_optimization": {"stage": 3}, "gradient_clipping": 0}
    assert dc.merged_config(_built(), same, dp_size=4, source="x") == dc.deep_merge(_built(), same)
    for section in ("optimizer", "scheduler"):
        with pytest.raises(ValueError, match=f"the file has a '{section}' section but the trainer builds"):
            dc.merged_config(_built(), {section: {"type": "Adam"}}, dp_size=4)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        dc.load_user_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{\"zero_optimization\": {")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        dc.load_user_config(tmp_path / "bad.json")
    (tmp_path / "dup.json").write_text("{\"steps_per_print\": 1, \"steps_per_print\": 2}")
    with pytest.raises(ValueError, match="key 'steps_per_print' appears twice"):
        dc.load_user_config(tmp_path / "dup.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        dc.load_user_config(tmp_path / "list.json")


def _dry_run(*overrides):
    return subprocess.run([sys.executable, str(ROOT / "pretrain_apt.py"), "--dry-run", "data.synthetic=true",
                           *overrides], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "WORLD_SIZE": "4"})


def test_dry_run_prints_the_merged_json_and_refuses_contradictions(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "wall_clock_breakdown": True}))
    r = _dry_run(f"parallel.deepspeed_config={user}", "micro_batch=1")
    assert r.returncode == 0, r.stderr
    head, js = r.stdout.split("JSON to the end of the output:\n", 1)
    assert f"({user} merged over the trainer's)" in head
    merged = json.loads(js)
    assert merged["zero_optimization"]["reduce_bucket_size"] == 1000 and merged["wall_clock_breakdown"] is True
    assert merged["train_micro_batch_size_per_gpu"] == 1 and merged["zero_optimization"]["stage"] == 3
    user.write_text(json.dumps({"train_batch_size": 64}))
    r = _dry_run(f"parallel.deepspeed_config={user}", "micro_batch=2")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"error: parallel.deepspeed_config {user}: train_batch_size is 64 in the file but the "
                                "trainer sets 8 (micro_batch x 4 data-parallel ranks; the exact global batch is "
                                "global_batch, planned by the trainer); remove it from the file or change the "
                                "training config")
    r = _dry_run(f"parallel.deepspeed_config={tmp_path / 'missing.json'}")
    assert r.returncode == 2 and "missing.json does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("precision, mode, bf16, autocast", [
    ("bf16", "params", True, False), ("bf16", "autocast", False, True),
    ("fp32", "params", False, False), ("fp32", "autocast", False, False)])
def test_the_bf16_mode_picks_deepspeeds_bf16_section_or_its_torch_autocast(precision, mode, bf16, autocast):
    built = _built(precision=precision, bf16_mode=mode)
    assert built["bf16"]["enabled"] is bf16 and built["torch_autocast"]["enabled"] is autocast
    assert built["torch_autocast"]["dtype"] == "bfloat16"


def test_a_bf16_file_under_the_autocast_mode_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"bf16.enabled is true in the file but the trainer sets false \(precision "
                                         r"and parallel.deepspeed_bf16\)"):
        dc.merged_config(_built(bf16_mode="autocast"), {"bf16": {"enabled": True}}, dp_size=1)
    with pytest.raises(ValueError, match=r"torch_autocast.enabled is false in the file but the trainer sets true"):
        dc.merged_config(_built(bf16_mode="autocast"), {"torch_autocast": {"enabled": False}}, dp_size=1)
