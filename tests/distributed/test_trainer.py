"""The trainer on 2 gloo ranks: every stage under TP=2 and under ZeRO-3 DP=2, the exact global batch with
ragged micro-batches, bit-identical resume, learning, and clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.ranks import run_distributed, save_debug_models, train_worker

os.environ.setdefault("DS_ACCELERATOR", "cpu")

COMMON = ["data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "data.synthetic_size=32", "precision=fp32",
          "parallel.zero_persistence_threshold=0", "log_every=1", "global_batch=8", "steps=10"]


def _stages(rank, world, base, run, layout):
    out = {}
    for stage, extra in [("flow", []), ("cd", [f"model.init={base}/diff", "cd.num_steps=4"]),
                         ("apt_image", [f"model.init={base}/cd", f"model.teacher={base}/diff"]),
                         ("apt_video", [f"model.init={base}/cd", f"model.teacher={base}/diff", "apt.timestep_shift=12",
                                        "apt.r1_sigma=0.1", "optim.lr=3e-6", "data.synthetic_shape=[4,2,8,8]"])]:
        hist = train_worker(rank, world, COMMON + layout + extra + [f"stage={stage}", f"run_dir={run}/{stage}", "steps=2",
                                                              "global_batch=4", "micro_batch=2"])
        out[stage] = hist
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    save_debug_models(base)
    return base


@pytest.mark.parametrize("layout", [["parallel.tp=2"], []], ids=["tp2", "zero3_dp2"])
def test_every_stage_runs_with_finite_losses(model_dirs, tmp_path, layout):
    res = run_distributed(_stages, 2, str(model_dirs), str(tmp_path), layout + ["parallel.engine=deepspeed"],
                          timeout=900)
    for stage, hist in res[0].items():
        assert len(hist) == 2, stage
        for h in hist:
            assert all(torch.isfinite(torch.tensor(v)) for k, v in h.items() if k.endswith("loss")), (stage, h)
        if stage.startswith("apt"):
            assert {"d_loss", "g_loss", "ar1", "logit_real", "logit_fake", "logit_gap"} <= set(hist[0])
        assert (tmp_path / stage / "checkpoints").is_dir()
    assert (tmp_path / "apt_image" / "export" / "generator_ema" / "model.safetensors").is_file()
    assert (tmp_path / "apt_image" / "export" / "discriminator" / "model.safetensors").is_file()
    lines = (tmp_path / "apt_video" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "samples_per_s" in json.loads(lines[0])


def test_exact_global_batch_with_ragged_micro_batches(model_dirs, tmp_path):
    """One update of N = 7 samples: 1 rank (one micro-batch of 7) vs 2 ZeRO-3 ranks (4 + 3 samples in
    micro-batches of 2: ragged). RMSProp with eps >> sqrt(v) makes the update lr * g / eps, i.e. linear
    in the gradient, so equal updates mean equal accumulated gradients."""
    common = COMMON + ["stage=flow", "steps=1", "global_batch=7", "optim.eps=1e6", "optim.lr=1e6",
                       "apt.ema_decay=0", "parallel.engine=deepspeed", f"model.init={model_dirs}/diff"]
    run_distributed(train_worker, 1, common + [f"run_dir={tmp_path}/one", "micro_batch=7"])
    run_distributed(train_worker, 2, common + [f"run_dir={tmp_path}/two", "micro_batch=2"])
    a = load_file(str(tmp_path / "one/export/model/model.safetensors"))
    b = load_file(str(tmp_path / "two/export/model/model.safetensors"))
    init = load_file(str(model_dirs / "diff" / "model.safetensors"))
    moved = 0
    for k in a:
        da, db = a[k] - init[k], b[k] - init[k]
        torch.testing.assert_close(db, da, rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")
        moved += int(da.abs().max() > 1e-6)
    assert moved > 10  # the update is not trivially zero


def test_resume_is_bit_identical(model_dirs, tmp_path):
    common = COMMON + ["stage=apt_image", f"model.init={model_dirs}/cd", f"model.teacher={model_dirs}/diff",
                       "global_batch=4", "micro_batch=2", "parallel.engine=deepspeed", "save_every=2"]
    full = run_distributed(train_worker, 2, common + [f"run_dir={tmp_path}/full", "steps=4"], timeout=900)[0]
    run_distributed(train_worker, 2, common + [f"run_dir={tmp_path}/cut", "steps=2"], timeout=900)
    # a checkpoint that a kill interrupted while it was written is never taken for a complete one
    (tmp_path / "cut/checkpoints/.step-00000003.partial").mkdir()
    rest = run_distributed(train_worker, 2, common + [f"run_dir={tmp_path}/cut", "steps=4"], timeout=900)[0]
    assert [h["step"] for h in rest] == [3, 4]
    for h_full, h_rest in zip(full[2:], rest):
        for k in ("d_loss", "g_loss", "ar1", "logit_gap"):
            assert h_full[k] == h_rest[k], (k, h_full[k], h_rest[k])
    for part in ("generator", "generator_ema", "discriminator"):
        a = load_file(str(tmp_path / f"full/export/{part}/model.safetensors"))
        b = load_file(str(tmp_path / f"cut/export/{part}/model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_flow_matching_learns(tmp_path):
    hist = run_distributed(train_worker, 1, COMMON + ["stage=flow", "steps=40", "global_batch=8", "micro_batch=8",
                                                "optim.optimizer=adamw", "optim.lr=2e-3", "parallel.engine=torch",
                                                "flow.text_dropout=0", f"run_dir={tmp_path}/fm"])[0]
    losses = [h["loss"] for h in hist]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_bad_inputs_are_reported(model_dirs, tmp_path):

    with pytest.raises(RuntimeError, match="does not exist or is incomplete"):
        run_distributed(train_worker, 1, ["stage=flow", "data.path=/nonexistent/ds", f"run_dir={tmp_path}/x"])
    with pytest.raises(RuntimeError, match="cannot be formed"):
        run_distributed(train_worker, 2, COMMON + ["stage=flow", "global_batch=1", f"run_dir={tmp_path}/y"])
    run_distributed(train_worker, 1, COMMON + ["stage=flow", "steps=1", "parallel.engine=torch", f"run_dir={tmp_path}/z"])
    with pytest.raises(RuntimeError, match="another shape"):
        run_distributed(train_worker, 1, COMMON + ["stage=flow", "steps=2", "parallel.engine=torch", f"run_dir={tmp_path}/z",
                                             "model.overrides={num_layers: 3}"])


def _apt_g_step_follows_d(rank, world, base, run):
    from megatron_apt.config.train import load_config
    from megatron_apt.methods.apt import generator_loss
    from megatron_apt.trainer.trainer import Trainer

    ov = COMMON + ["parallel.engine=torch", "parallel.activation_checkpointing=false", "stage=apt_image",
                   f"model.init={base}/cd", f"model.teacher={base}/diff", "steps=1", "global_batch=16",
                   "micro_batch=16", "optim.lr=1e-4", f"run_dir={run}", "data.synthetic_size=64"]
    tr = Trainer(load_config(None, ov))
    st = tr.method
    mbs = tr.micro_batches(0)
    z, t = st.g_draws(mbs[0], 0)

    def g_loss():  # L_G (Eq. 2) of the same z, t under the same (frozen) D
        with torch.no_grad():
            return float(generator_loss(st.D.raw, st.G, mbs[0]["text"], mbs[0]["text_mask"], shape=z.shape,
                                        cfg=st.apt, z=z, t=t)[0])

    d_before = [p.detach().clone() for p in st.D.module.parameters()]
    before = g_loss()
    st._g_update(0, mbs)
    after = g_loss()
    d_same = all(torch.equal(a, p) for a, p in zip(d_before, st.D.module.parameters()))
    return before, after, d_same


def test_generator_update_lowers_its_loss_under_the_discriminator(model_dirs, tmp_path):
    """G's update follows the gradient that flows back through D: one small step lowers L_G under the same D
    (and leaves D unchanged). If G's gradients stopped at D's input, L_G would not move."""
    before, after, d_same = run_distributed(_apt_g_step_follows_d, 1, str(model_dirs), str(tmp_path / "apt"),
                                            timeout=900)[0]
    assert d_same and after < before - 5e-4, (before, after)
