"""The small pieces behind the fault handling: a non-finite loss yields non-finite gradients, strict JSON
records, plain names for anything read from a file that becomes a path, and checkpoint file checks."""

import json

import pytest
import torch

from megatron_apt.checkpoint import integrity
from megatron_apt.parallel.comm import nan_grads_if_nonfinite
from megatron_apt.utils import check_plain_name, json_safe, strict_dumps


def test_a_non_finite_loss_makes_every_gradient_non_finite():
    p = torch.nn.Parameter(torch.ones(3))
    (p * 2).sum().add(float("nan")).backward()  # a NaN term no parameter feeds: plain backward is finite
    assert torch.isfinite(p.grad).all()
    p.grad = None
    nan_grads_if_nonfinite((p * 2).sum().add(float("nan"))).backward()
    assert torch.isnan(p.grad).all()
    p.grad = None
    nan_grads_if_nonfinite((p * 2).sum()).backward()  # a finite loss is left alone
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_records_are_strict_json():
    rec = {"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "mfu": None, "ok": True}
    line = strict_dumps(json_safe(rec))

    def refuse(c):
        raise ValueError(c)

    back = json.loads(line, parse_constant=refuse)
    assert back == {"step": 3, "loss": None, "grad_norm": None, "mfu": None, "ok": True,
                    "nonfinite": ["grad_norm", "loss"]}
    with pytest.raises(ValueError):
        strict_dumps(rec)


@pytest.mark.parametrize("name", ["G", "model_ema", "generator-2", "rank00000.safetensors"])
def test_plain_names_pass(name):
    assert check_plain_name(name, "name") == name


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "/abs", "", "x\\y", "a\nb", 7, None])
def test_names_that_would_leave_a_folder_are_refused(name):
    with pytest.raises(ValueError, match="not a plain name"):
        check_plain_name(name, "model name")


def test_checkpoint_files_are_checked_against_recorded_sizes_and_checksums(tmp_path):
    (tmp_path / "rank00000.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "rank00000.json").write_text("{}")
    files = {n: integrity.digest_record(*integrity.file_digest(tmp_path / n)) for n in integrity.rank_files(0)}
    (tmp_path / "trainer.json").write_text(json.dumps({"step": 2, "world_size": 1, "models": {"G": {}},
                                                       "files": files}))
    assert integrity.verify_checkpoint(tmp_path)["step"] == 2
    data = tmp_path / "rank00000.safetensors"
    data.write_bytes(b"x" * 999 + b"y")
    with pytest.raises(integrity.CheckpointError, match="rank00000.safetensors does not match its recorded checksum"):
        integrity.verify_checkpoint(tmp_path)
    data.write_bytes(b"x" * 10)
    with pytest.raises(integrity.CheckpointError, match="has 10 bytes where 1000 were written"):
        integrity.verify_checkpoint(tmp_path)
    data.unlink()
    with pytest.raises(integrity.CheckpointError, match="missing the shard of rank 0"):
        integrity.verify_checkpoint(tmp_path)
    for meta, msg in [("{", "not valid JSON"), ('{"world_size": 1}', "no valid 'step'"), ("[1]", "JSON object"),
                      ('{"step": 1, "models": {"../x": {}}}', "not a plain name")]:
        (tmp_path / "trainer.json").write_text(meta)
        with pytest.raises(integrity.CheckpointError, match=msg):
            integrity.read_trainer_meta(tmp_path)
