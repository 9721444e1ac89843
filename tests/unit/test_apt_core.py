"""APT core: the generator, the multi-layer discriminator, the timestep ensemble, the losses, aR1 vs R1."""

import math

import pytest
import torch

from megatron_apt.config import DiscriminatorConfig
from megatron_apt.methods.apt import (
    APTConfig,
    approx_r1,
    d_adversarial_loss,
    discriminator_loss,
    exact_r1,
    g_adversarial_loss,
    generator_loss,
    sample_timesteps,
    shift_timestep,
)
from megatron_apt.inference.sampling import renoise
from megatron_apt.models import Discriminator, OneStepGenerator, build_mmdit


def make_pair(seed=0, dtype=torch.float32):
    G = OneStepGenerator(build_mmdit("debug", zero_init=False, seed=seed)).to(dtype)
    D = Discriminator(build_mmdit("debug", zero_init=False, seed=seed + 1))
    D.init_heads(generator=torch.Generator().manual_seed(seed + 2))
    return G, D.to(dtype)


def batch(B=2, T=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, T, 8, 8, generator=g).to(dtype)
    text = torch.randn(B, 5, 24, generator=g).to(dtype)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, text, mask


def test_shift_hand_computed():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_timestep(t, 1.0), t)
    # s = 12: 12 * 0.25 / (1 + 11 * 0.25) = 3 / 3.75 = 0.8;  12 * 0.5 / 6.5 = 0.923077
    torch.testing.assert_close(shift_timestep(t, 12.0), torch.tensor([0.0, 0.8, 12 * 0.5 / 6.5, 1.0]))
    ts = sample_timesteps(10000, 12.0, torch.Generator().manual_seed(0))
    assert 0 <= ts.min() and ts.max() <= 1 and ts.median() > 0.85  # s=12 pushes toward noise
    with pytest.raises(ValueError, match="shift"):
        shift_timestep(t, 0.0)


def test_loss_formulas_hand_computed():
    real = torch.tensor([2.0, -1.0])
    fake = torch.tensor([0.5, -3.0])
    sp = lambda a: math.log1p(math.exp(a))  # noqa: E731
    want_d = (sp(-2.0) + sp(1.0)) / 2 + (sp(0.5) + sp(-3.0)) / 2
    assert d_adversarial_loss(real, fake).item() == pytest.approx(want_d, rel=1e-6)
    assert g_adversarial_loss(fake).item() == pytest.approx((sp(-0.5) + sp(3.0)) / 2, rel=1e-6)
    assert approx_r1(real, torch.tensor([1.0, 1.0])).item() == pytest.approx((1 + 4) / 2)
    # softplus form stays finite where log(sigmoid) would underflow
    assert torch.isfinite(d_adversarial_loss(torch.tensor([-200.0]), torch.tensor([200.0])))


@pytest.mark.parametrize("depth,want", [(36, (16, 26, 36)), (20, (9, 14, 20)), (4, (2, 3, 4)), (6, (3, 4, 6))])
def test_head_placement_for_other_depths(depth, want):
    assert DiscriminatorConfig().resolve_layers(depth) == want


def test_bad_configuration_fails_early():
    with pytest.raises(ValueError, match="outside"):
        DiscriminatorConfig(head_layers=(2, 5)).resolve_layers(4)
    with pytest.raises(ValueError, match="duplicates"):
        DiscriminatorConfig(head_layers=(2, 2)).resolve_layers(4)
    with pytest.raises(ValueError, match="duplicates"):
        DiscriminatorConfig().resolve_layers(2)
    with pytest.raises(ValueError, match="r1_sigma"):
        APTConfig(r1_sigma=0.0)
    with pytest.raises(ValueError, match="r1_lambda"):
        APTConfig(r1_lambda=-1.0)
    with pytest.raises(ValueError, match="timestep_shift"):
        APTConfig(timestep_shift=0.0)


def test_generator_is_z_minus_velocity_at_T_and_multistep():
    G, _ = make_pair()
    x, text, mask = batch()
    z = torch.randn_like(x)
    with torch.no_grad():
        v = G.backbone(z, torch.ones(2), text, mask)
        torch.testing.assert_close(G(z, text, mask), z - v)
        torch.testing.assert_close(renoise(lambda x, t: G.backbone(x, torch.full((2,), t), text, mask), z, [1, 0]),
                                   z - v)


def test_generator_step_reaches_every_g_param_and_changes_no_d_param():
    G, D = make_pair()
    x, text, mask = batch()
    cfg = APTConfig()
    D.requires_grad_(False)
    loss, metrics, fake = generator_loss(D, G, text, mask, shape=x.shape, cfg=cfg,
                                         generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name, p in G.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached G's {name}"
    assert all(p.grad is None for p in D.parameters())
    d_before = {k: v.clone() for k, v in D.state_dict().items()}
    torch.optim.RMSprop(G.parameters(), lr=1e-3, alpha=0.9).step()
    assert all(torch.equal(d_before[k], v) for k, v in D.state_dict().items())


def test_discriminator_step_changes_no_g_param():
    G, D = make_pair()
    x, text, mask = batch()
    g_before = {k: v.clone() for k, v in G.state_dict().items()}
    loss, metrics = discriminator_loss(D, G, x, text, mask, cfg=APTConfig(),
                                       generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in G.parameters())
    assert sum(p.grad.abs().sum() for p in D.parameters() if p.grad is not None) > 0
    torch.optim.RMSprop(D.parameters(), lr=1e-3, alpha=0.9).step()
    assert all(torch.equal(g_before[k], v) for k, v in G.state_dict().items())
    assert set(metrics) >= {"d_loss", "ar1", "logit_real", "logit_fake", "logit_gap"}


def test_fused_and_separate_d_forward_agree():
    G, D = make_pair()
    x, text, mask = batch()
    a, ma = discriminator_loss(D, G, x, text, mask, cfg=APTConfig(fused_d_forward=True),
                               generator=torch.Generator().manual_seed(3))
    b, mb = discriminator_loss(D, G, x, text, mask, cfg=APTConfig(fused_d_forward=False),
                               generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_approximated_r1_approaches_exact_r1():
    """E[(D(x + sigma eps) - D(x))^2] / sigma^2 -> ||grad_x D||^2 as sigma -> 0 (float64, many draws)."""
    _, D = make_pair(dtype=torch.float64)
    x, text, mask = batch(B=1, dtype=torch.float64)
    t = torch.tensor([0.4], dtype=torch.float64)
    r1 = exact_r1(D, x, t, text, mask).item()
    assert r1 > 0
    g = torch.Generator().manual_seed(0)
    # (g . eps)^2 / |g|^2 is chi-square(1): relative std sqrt(2 / draws) = 2.2% for 4096 draws
    draws, chunk = 4096, 1024
    errs = {}
    with torch.no_grad():
        base = D(x, t, text, mask)
        xs = x.expand(chunk, *x.shape[1:])
        for sigma in (1.0, 0.1, 0.01, 0.001):
            total = 0.0
            for _ in range(draws // chunk):
                eps = torch.randn(xs.shape, generator=g, dtype=torch.float64)
                pert = D(xs + sigma * eps, t.expand(chunk), text.expand(chunk, -1, -1), mask.expand(chunk, -1))
                total += approx_r1(base.expand(chunk), pert).item() * chunk
            ar1 = total / draws / sigma**2
            errs[sigma] = abs(ar1 - r1) / r1
    print("relative error of aR1/sigma^2 vs exact R1:", {s: f"{e:.3f}" for s, e in errs.items()})
    assert errs[0.001] < 0.05 and errs[0.01] < 0.05
    assert errs[1.0] > errs[0.001]  # the approximation improves as sigma shrinks
