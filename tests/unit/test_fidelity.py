"""The paper's details, pinned (§3.2-3.5, Fig. 1, Eqs. 5-10): per-stage defaults, the negative prompt of
consistency distillation and its CFG Euler target, the EMA, the APT initialisation and model kinds, the
two-step sampler, the two readings of aR1's sigma, the optimizers, the discriminator heads."""

import math

import pytest
import torch

from megatron_apt.config.train import load_config
from megatron_apt.inference.sampling import renoise
from megatron_apt.methods.apt import APTConfig, discriminator_loss, r1_noise_std
from megatron_apt.models import Discriminator, build_mmdit
from megatron_apt.models.attention import RMSNorm
from megatron_apt.models.conditioning import cfg_text_batch
from megatron_apt.models.discriminator import CrossAttentionHead, check_head_layout
from tests.helpers.ranks import run_distributed, save_debug_models
from megatron_apt.trainer.engines import make_optimizer

SMALL = ["data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "data.synthetic_size=8", "precision=fp32",
         "parallel.engine=torch", "global_batch=2", "micro_batch=2", "steps=3", "log_every=1"]

# §3.5: lr, aR1 sigma, D timestep shift, lambda, EMA, RMSProp alpha, batch, updates
PAPER_TABLE = {
    "apt_image": dict(lr=5e-6, sigma=0.01, shift=1.0, lam=100.0, ema=0.995, alpha=0.9, batch=9062, steps=350),
    "apt_video": dict(lr=3e-6, sigma=0.1, shift=12.0, lam=100.0, ema=0.995, alpha=0.9, batch=2048, steps=300),
}


@pytest.mark.parametrize("stage", sorted(PAPER_TABLE))
def test_each_stage_resolves_to_the_papers_values(stage):
    want = PAPER_TABLE[stage]
    cfg = load_config(None, [f"stage={stage}", "data.synthetic=true"])
    got = dict(lr=cfg.optim.lr, sigma=cfg.apt.r1_sigma, shift=cfg.apt.timestep_shift, lam=cfg.apt.r1_lambda,
               ema=cfg.apt.ema_decay, alpha=cfg.optim.alpha, batch=cfg.global_batch, steps=cfg.steps)
    assert got == want
    assert cfg.optim.optimizer == "rmsprop" and cfg.optim.weight_decay == 0 and cfg.optim.grad_clip == 0
    assert cfg.precision == "bf16" and cfg.apt.r1_sigma_means == "variance"
    assert load_config(None, ["stage=cd", "data.synthetic=true"]).cd.cfg_scale == 7.5
    # a YAML or an override still wins over the stage's values
    assert load_config(None, [f"stage={stage}", "data.synthetic=true", "optim.lr=1e-4"]).optim.lr == 1e-4


def test_the_video_values_follow_the_final_stage(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stage: apt_image\ndata:\n  synthetic: true\n")
    assert load_config(f, ["stage=apt_video"]).apt.timestep_shift == 12.0
    assert load_config(f).apt.timestep_shift == 1.0


# ---- optimizers (§3.5) ------------------------------------------------------------------------------------
def _two_updates(name, grads, lr=0.1, alpha=0.9, eps=1e-8):
    p = torch.nn.Parameter(torch.zeros(len(grads[0]), dtype=torch.float64))
    opt = make_optimizer([p], name, lr=lr, alpha=alpha, eps=eps, weight_decay=0.0)
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        before = p.detach().clone()
        opt.step()
        out.append((p.detach() - before).tolist())
    return out


def test_rmsprop_and_adam_updates_by_hand():
    g1, g2 = [2.0, -0.5], [1.0, 3.0]
    lr, a, eps = 0.1, 0.9, 1e-8
    # torch RMSProp: v = a v + (1 - a) g^2, step -lr g / (sqrt(v) + eps), no bias correction
    v1 = [(1 - a) * g * g for g in g1]
    v2 = [a * v + (1 - a) * g * g for v, g in zip(v1, g2)]
    want_rms = [[-lr * g / (math.sqrt(v) + eps) for g, v in zip(g1, v1)],
                [-lr * g / (math.sqrt(v) + eps) for g, v in zip(g2, v2)]]
    # Adam(beta1 = 0, beta2 = a): m = g, v-hat = v / (1 - a^k)
    want_adam = [[-lr * g / (math.sqrt(v / (1 - a)) + eps) for g, v in zip(g1, v1)],
                 [-lr * g / (math.sqrt(v / (1 - a * a)) + eps) for g, v in zip(g2, v2)]]
    got_rms, got_adam = _two_updates("rmsprop", [g1, g2]), _two_updates("adam", [g1, g2])
    for got, want in ((got_rms, want_rms), (got_adam, want_adam)):
        for a_, b_ in zip(got, want):
            assert a_ == pytest.approx(b_, rel=1e-12)
    # the first RMSProp update is sqrt(1 / (1 - alpha)) ~ 3.16x Adam's
    assert got_rms[0][0] / got_adam[0][0] == pytest.approx(math.sqrt(1 / (1 - a)), rel=1e-6)


# ---- aR1 (Eq. 9) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("means", ["variance", "std"])
def test_ar1_perturbation_under_both_readings(means):
    torch.manual_seed(0)
    D = Discriminator(build_mmdit("debug", zero_init=False, seed=1))
    D.init_heads(generator=torch.Generator().manual_seed(2))
    G = torch.nn.Identity()
    g = torch.Generator().manual_seed(3)
    x, z, eps = (torch.randn(2, 4, 1, 8, 8, generator=g) for _ in range(3))
    text, mask = torch.randn(2, 5, 24, generator=g), torch.ones(2, 5, dtype=torch.bool)
    t = torch.tensor([0.3, 0.8])
    cfg = APTConfig(r1_sigma=0.01, r1_sigma_means=means)
    std = 0.1 if means == "variance" else 0.01
    assert r1_noise_std(cfg) == pytest.approx(std)
    _, m = discriminator_loss(D, lambda zz, *a: G(zz), x, text, mask, cfg=cfg, z=z, t_real=t, t_fake=t, eps=eps)
    with torch.no_grad():
        want = (D(x, t, text, mask) - D(x + std * eps, t, text, mask)).pow(2).mean()
        other = (D(x, t, text, mask) - D(x + (0.11 - std) * eps, t, text, mask)).pow(2).mean()  # the other reading
    # rel 1e-3: D runs on [real, perturbed, fake] as one batch there, one at a time here
    assert float(m["ar1"]) == pytest.approx(float(want), rel=1e-3)
    assert abs(math.log(float(other) / float(want))) > 2  # the readings differ ~100x in aR1
    with pytest.raises(ValueError, match="r1_sigma_means"):
        APTConfig(r1_sigma_means="stdev")


# ---- discriminator heads (Fig. 1) -----------------------------------------------------------------------------
def test_heads_are_pre_rmsnorm_qk_rmsnorm_blocks():
    h = CrossAttentionHead(32, 4)
    assert all(isinstance(m, RMSNorm) for m in (h.norm_q, h.norm_kv, h.norm_mlp, h.q_norm, h.k_norm))
    assert h.q_norm.weight.shape == (8,)
    D = Discriminator(build_mmdit("debug", zero_init=False, seed=1))
    D.init_heads(generator=torch.Generator().manual_seed(0))
    assert isinstance(D.norm, torch.nn.LayerNorm)  # the final norm over the concatenated tokens
    # the QK norm acts: scaling q's norm weight changes the logit
    x, text = torch.randn(1, 4, 1, 8, 8), torch.randn(1, 3, 24)
    before = D(x, torch.tensor([0.5]), text).item()
    with torch.no_grad():
        D.heads[0].q_norm.weight.mul_(3.0)
    assert D(x, torch.tensor([0.5]), text).item() != pytest.approx(before)
    with pytest.raises(ValueError, match="earlier layout"):
        check_head_layout(["backbone.x", "heads.0.norm_kv.bias"], "old.safetensors")


# ---- two-step sampling (§3.5) ------------------------------------------------------------------------------
def test_two_step_renoises_the_first_prediction_by_hand():
    m = build_mmdit("debug", zero_init=False, seed=4)
    g = torch.Generator().manual_seed(0)
    z, text, mask = torch.randn(2, 4, 1, 8, 8, generator=g), torch.randn(2, 3, 24, generator=g), torch.ones(2, 3,
                                                                                                               dtype=torch.bool)

    def vel(x, t):
        return m(x, torch.full((2,), t), text, mask)

    with torch.no_grad():
        one = renoise(vel, z, [1.0, 0.0])
        two = renoise(vel, z, [1.0, 0.4, 0.0], torch.Generator().manual_seed(7))
        x0 = z - vel(z, 1.0)
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
        xm = 0.6 * x0 + 0.4 * eps
        want = xm - 0.4 * vel(xm, 0.4)
    torch.testing.assert_close(one, x0)
    torch.testing.assert_close(two, want)
    assert not torch.allclose(two, one, atol=1e-3)
    with pytest.raises(ValueError, match="decrease"):
        renoise(vel, z, [1.0, 0.5, 0.6, 0.0])


# ---- consistency distillation (§3.2) through the trainer ------------------------------------------------
def _cd_worker(rank, world, base, run, negative, interval=None):
    from megatron_apt.models.text_encoder import TokenEmbedder
    from megatron_apt.models.text_encoder import ByteTokenizer
    from megatron_apt.trainer.trainer import Trainer

    cfg = load_config(None, SMALL + ["stage=cd", f"model.init={base}/diff", f"run_dir={run}", "cd.num_steps=4",
                                     "cd.shift=1", f"cd.negative_prompt={negative}"]
                      + ([f"cd.guidance_interval={interval}"] if interval else []))
    tr = Trainer(cfg)
    st = tr.method
    out = {}
    if negative:
        ids, m = ByteTokenizer()([negative])
        feats, mask = st.negative
        out["neg_ok"] = torch.equal(feats, TokenEmbedder(24)(ids)) and torch.equal(mask, m)
    mb = tr.micro_batches(0)[0]
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(mb["x"].shape, generator=g)
    tn, tp = torch.tensor([0.75, 0.5]), torch.tensor([0.5, 0.25])
    text, mask = mb["text"], mb["text_mask"]
    out["target"] = st.cd_targets([(xt, tn, tp)], [mb])[0]
    # by hand: conditional and unconditional teacher velocities, CFG 7.5, Euler t_n -> t_{n-1}, EMA target f
    with torch.no_grad():
        vc = st.teacher.module(xt, tn, text, mask)
        if negative:
            nt = st.negative[0].expand(2, -1, -1)
            vu = st.teacher.module(xt, tn, nt, st.negative[1].expand(2, -1))
        else:
            vu = st.teacher.module(xt, tn, torch.zeros_like(text), torch.zeros_like(mask))
        # a guidance interval (lo, hi]: guided where lo < t_n <= hi, the conditional velocity elsewhere
        lo, hi = interval or (0.0, 1.0)
        scale = torch.where((tn > lo) & (tn <= hi), 7.5, 1.0).view(-1, 1, 1, 1, 1)
        v = vu + scale * (vc - vu)
        xp = xt + (tp - tn).view(-1, 1, 1, 1, 1) * v
        ema = build_mmdit("debug", zero_init=False, seed=1)  # the target starts as the student's init
        out["hand"] = xp - tp.view(-1, 1, 1, 1, 1) * ema(xp, tp, text, mask)
    # EMA of the target network after k updates: the closed form of decay d = cd.ema_decay
    d = cfg.cd.ema_decay
    p0 = [p.detach().clone() for p in st.engine.module.parameters()]
    history = []
    for s in range(3):
        st.train_step(s, tr.micro_batches(s))
        history.append([p.detach().clone() for p in st.engine.module.parameters()])
    closed = [d ** 3 * a + sum((1 - d) * d ** (2 - i) * h[j] for i, h in enumerate(history))
              for j, a in enumerate(p0)]
    out["ema_err"] = max(float((e - c).abs().max()) for e, c in zip(st.engine.ema, closed))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_debug_models(tmp_path_factory.mktemp("fidelity"))


@pytest.mark.distributed
def test_cd_target_uses_the_negative_prompt_and_a_cfg_euler_step(models, tmp_path):
    neg = run_distributed(_cd_worker, 1, str(models), str(tmp_path / "a"), "blurry, low quality")[0]
    null = run_distributed(_cd_worker, 1, str(models), str(tmp_path / "b"), "")[0]
    assert neg["neg_ok"]
    torch.testing.assert_close(neg["target"], neg["hand"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(null["target"], null["hand"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(neg["target"], null["target"], atol=1e-4)  # the prompt changes the target
    assert neg["ema_err"] < 1e-6 and null["ema_err"] < 1e-6


@pytest.mark.distributed
def test_cd_guidance_interval_guides_only_inside_it(models, tmp_path):
    # t_n = 0.75 lies in (0.6, 1], t_n = 0.5 does not: one sample guided, one conditional only
    part = run_distributed(_cd_worker, 1, str(models), str(tmp_path / "i"), "", [0.6, 1.0])[0]
    full = run_distributed(_cd_worker, 1, str(models), str(tmp_path / "f"), "")[0]
    torch.testing.assert_close(part["target"], part["hand"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part["target"][0], full["target"][0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(part["target"][1], full["target"][1], atol=1e-4)


def _apt_worker(rank, world, base, run, init, teacher):
    from megatron_apt.trainer.trainer import Trainer

    cfg = load_config(None, SMALL + ["stage=apt_image", f"model.init={init}", f"model.teacher={teacher}",
                                     f"run_dir={run}", "optim.lr=1e-3"])
    try:
        tr = Trainer(cfg)
    except ValueError as e:
        return {"error": str(e)}
    st = tr.method
    from megatron_apt.checkpoint.model_dir import load_mmdit

    ghat, diff = load_mmdit(init).state_dict(), load_mmdit(teacher).state_dict()
    g_sd = st.G.module.backbone.state_dict()
    d_sd = st.D.module.backbone.state_dict()
    out = {"g_is_ghat": all(torch.equal(g_sd[k], v) for k, v in ghat.items()),
           "d_is_teacher": all(torch.equal(d_sd[k], v) for k, v in diff.items())}
    d = cfg.apt.ema_decay
    p0 = [p.detach().clone() for p in st.G.module.parameters()]
    hist = []
    for s in range(3):
        st.train_step(s, tr.micro_batches(s))
        hist.append([p.detach().clone() for p in st.G.module.parameters()])
    closed = [d ** 3 * a + sum((1 - d) * d ** (2 - i) * h[j] for i, h in enumerate(hist)) for j, a in enumerate(p0)]
    out["ema_err"] = max(float((e - c).abs().max()) for e, c in zip(st.G.ema, closed))
    out["moved"] = max(float((h - a).abs().max()) for h, a in zip(hist[-1], p0))
    return out


@pytest.mark.distributed
def test_apt_starts_g_from_ghat_and_d_from_the_teacher_and_keeps_an_ema(models, tmp_path):
    r = run_distributed(_apt_worker, 1, str(models), str(tmp_path / "ok"), f"{models}/cd", f"{models}/diff")[0]
    assert r["g_is_ghat"] and r["d_is_teacher"]
    assert r["moved"] > 1e-4 and r["ema_err"] < 1e-6  # EMA 0.995 after 3 updates = its closed form
    swapped = run_distributed(_apt_worker, 1, str(models), str(tmp_path / "sw"), f"{models}/diff", f"{models}/cd")[0]
    assert "model.init=" in swapped["error"] and "'diffusion'" in swapped["error"] and "G-hat" in swapped["error"]


def test_cfg_batch_pads_the_negative_prompt():
    text, mask = torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    neg = (torch.randn(1, 5, 4), torch.ones(1, 5, dtype=torch.bool))
    t2, m2 = cfg_text_batch(text, mask, neg)
    assert t2.shape == (4, 5, 4) and torch.equal(t2[2:], neg[0].expand(2, -1, -1)) and torch.equal(t2[:2, :3], text)
    assert not m2[:2, 3:].any() and m2[2:].all()
    t0, m0 = cfg_text_batch(text, mask)
    assert t0.shape == (4, 3, 4) and not t0[2:].any() and not m0[2:].any()
