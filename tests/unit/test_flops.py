"""Analytic FLOP counts (megatron_apt.models.flops) against a brute-force count of the real models.

The brute force is `torch.utils.flop_counter.FlopCounterMode`, which counts matrix products (mm, addmm, bmm)
as 2 m n k and SDPA as 4 B H Lq Lk Dh forward / 2x that backward, exactly the analytic conventions; both
ignore element-wise work (norms, rotary, softmax, activations). On a CPU, PyTorch's fused SDPA kernel has
no FLOP formula registered (the counter would see zero attention FLOPs), so the brute force runs the MATH
backend, whose decomposition into batched products the counter sees. With that the two counts agree
exactly; the tests still allow 1e-6 relative slack.
"""

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_apt.config import DiscriminatorConfig
from megatron_apt.config.model import get_model_config
from megatron_apt.methods.apt import APTConfig, discriminator_loss, generator_loss
from megatron_apt.models import flops as mf
from megatron_apt.models import Discriminator, OneStepGenerator, build_mmdit
from megatron_apt.parallel import ParallelDims, parallelize_mmdit

REL = 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls: extra threads only add synchronisation, which costs seconds on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def counting():
    fc = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), fc:
        yield fc


def inputs(cfg, B=2, T=3, H=8, W=8, Lc=5, mask=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, Lc, cfg.text_dim, generator=g)
    m = None
    if mask:
        m = torch.ones(B, Lc, dtype=torch.bool)
        m[0, Lc // 2:] = False  # padding costs the same: SDPA attends over the padded length
    pooled = torch.randn(B, cfg.pooled_dim, generator=g) if cfg.pooled_dim else None
    return x, t, text, m, pooled, mf.visual_tokens(cfg, (T, H, W))


@pytest.mark.parametrize("preset", ["debug", "toy"])
def test_forward_and_backward_match_flop_counter(preset):
    model = build_mmdit(preset, zero_init=False)
    cfg = model.config
    x, t, text, _, _, Lx = inputs(cfg)
    B, Lc = x.shape[0], text.shape[1]
    with counting() as fc, torch.no_grad():
        model(x, t, text)
    assert fc.get_total_flops() == pytest.approx(mf.mmdit_forward_flops(cfg, B, Lx, Lc), rel=REL)
    # full training backward: weight gradients everywhere, no input gradient for the raw inputs
    with counting() as fc:
        model(x, t, text).square().mean().backward()
    want = mf.mmdit_forward_flops(cfg, B, Lx, Lc) + mf.mmdit_backward_flops(cfg, B, Lx, Lc)
    assert fc.get_total_flops() == pytest.approx(want, rel=REL)
    # the convention "backward = 2 x forward" is within a few percent (the first layers need no input grad)
    assert 1.9 < mf.mmdit_backward_flops(cfg, B, Lx, Lc) / mf.mmdit_forward_flops(cfg, B, Lx, Lc) <= 2.0


def test_sd3_layout_per_block_adaln_pooled_mask_and_unused_text_query():
    # per-block modulation, a pooled embedder, sin-cos positions, a text padding mask, and an SD3-style
    # context-pre-only last block that keeps its unused text query Linear (never computed: not counted)
    model = build_mmdit("debug", zero_init=False, adaln="per_block", pooled_dim=12, pos_embed="sincos2d",
                        pos_embed_max_size=16, pos_embed_base_size=8, keep_unused_text_query=True)
    cfg = model.config
    assert model.blocks[-1].attn.c_q is not None
    x, t, text, mask, pooled, Lx = inputs(cfg, T=1, mask=True)
    B, Lc = x.shape[0], text.shape[1]
    with counting() as fc:
        model(x, t, text, mask, pooled).sum().backward()
    want = mf.mmdit_forward_flops(cfg, B, Lx, Lc) + mf.mmdit_backward_flops(cfg, B, Lx, Lc)
    assert fc.get_total_flops() == pytest.approx(want, rel=REL)


def test_features_at_stops_early_and_context_pre_only_block():
    model = build_mmdit("debug", zero_init=False)
    cfg = model.config
    x, t, text, _, _, Lx = inputs(cfg)
    B, Lc = x.shape[0], text.shape[1]
    for upto in (1, 2, cfg.num_layers):
        with counting() as fc, torch.no_grad():
            model(x, t, text, features_at=[upto])
        assert fc.get_total_flops() == pytest.approx(mf.mmdit_forward_flops(cfg, B, Lx, Lc, upto_layer=upto), rel=REL)
    per_layer = mf.mmdit_forward_flops(cfg, B, Lx, Lc, 2) - mf.mmdit_forward_flops(cfg, B, Lx, Lc, 1)
    last = mf.mmdit_forward_flops(cfg, B, Lx, Lc, 4) - mf.mmdit_forward_flops(cfg, B, Lx, Lc, 3)
    assert last < per_layer  # the last block computes no text queries, text outputs or text MLP
    with pytest.raises(ValueError, match="upto_layer"):
        mf.mmdit_forward_flops(cfg, B, Lx, Lc, upto_layer=cfg.num_layers + 1)


def _discriminator(preset="debug"):
    D = Discriminator(build_mmdit(preset, zero_init=False, seed=1), DiscriminatorConfig())
    D.init_heads(generator=torch.Generator().manual_seed(2))
    return D


def test_discriminator_trained_and_frozen_input_gradient():
    D = _discriminator()
    cfg = D.backbone.config
    x, t, text, _, _, Lx = inputs(cfg)
    B, Lc = x.shape[0], text.shape[1]
    fwd = mf.discriminator_forward_flops(cfg, B, Lx, Lc)
    with counting() as fc:  # (not under no_grad: the counter's module tracker trips on the head's query)
        D(x, t, text)
    assert fc.get_total_flops() == pytest.approx(fwd, rel=REL)
    # D's own update: weight gradients
    with counting() as fc:
        D(x, t, text).sum().backward()
    assert fc.get_total_flops() == pytest.approx(fwd + mf.discriminator_backward_flops(cfg, B, Lx, Lc), rel=REL)
    # G's update: D frozen, gradient to its input only. Linears cost one product, attention's backward still
    # forms dQ, dK and dV, so this backward is more than one forward but less than two.
    D.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    with counting() as fc:
        D(xg, t, text).sum().backward()
    bwd_in = mf.discriminator_backward_flops(cfg, B, Lx, Lc, weights_grad=False, input_grad=True)
    assert fc.get_total_flops() == pytest.approx(fwd + bwd_in, rel=REL)
    assert fwd < bwd_in < 2 * fwd


@pytest.mark.parametrize("checkpointing", [False, True])
def test_apt_step_matches_flop_counter(checkpointing):
    """One real APT step (D update, then G update through a frozen D) against apt_step_flops; with
    activation checkpointing the counter also sees the recomputation, i.e. the 'hardware' count."""
    G = OneStepGenerator(build_mmdit("debug", zero_init=False, seed=0))
    D = _discriminator()
    if checkpointing:
        parallelize_mmdit(G, ParallelDims(), activation_checkpointing=True)
        parallelize_mmdit(D, ParallelDims(), activation_checkpointing=True)
    cfg = G.config
    x, _, text, _, _, Lx = inputs(cfg, B=1, T=2)
    B, Lc = x.shape[0], text.shape[1]
    apt = APTConfig(r1_sigma=0.1, timestep_shift=12.0)
    gen = torch.Generator().manual_seed(0)
    with counting() as fc:
        d_loss, _ = discriminator_loss(D, G, x, text, cfg=apt, generator=gen)
        d_loss.backward()
        D.requires_grad_(False)
        g_loss, _, _ = generator_loss(D, G, text, shape=x.shape, cfg=apt, generator=gen)
        g_loss.backward()
        D.requires_grad_(True)
    step = mf.apt_step_flops(cfg, B, Lx, Lc, DiscriminatorConfig(), activation_checkpointing=checkpointing)
    assert fc.get_total_flops() == pytest.approx(step.hardware, rel=REL)
    assert step.model == sum(step.parts.values())
    assert (step.hardware > step.model) == checkpointing
    # the brief's rule of thumb, 4 F_G + 11 F_D, differs only by the frozen-D input-gradient backward
    F_G = mf.mmdit_forward_flops(cfg, B, Lx, Lc)
    F_D = mf.discriminator_forward_flops(cfg, B, Lx, Lc)
    assert step.model == pytest.approx(4 * F_G + 11 * F_D, rel=0.15)


def test_flow_step_matches_flop_counter_with_checkpointing():
    model = parallelize_mmdit(build_mmdit("toy", zero_init=False), ParallelDims(), activation_checkpointing=True)
    cfg = model.config
    x, t, text, _, _, Lx = inputs(cfg)
    B, Lc = x.shape[0], text.shape[1]
    with counting() as fc:
        model(x, t, text).square().mean().backward()
    step = mf.flow_matching_step_flops(cfg, B, Lx, Lc)
    assert fc.get_total_flops() == pytest.approx(step.hardware, rel=REL)
    assert step.forward_equivalents == pytest.approx(3.0, rel=0.02)
    no_ckpt = mf.flow_matching_step_flops(cfg, B, Lx, Lc, activation_checkpointing=False)
    assert no_ckpt.hardware == no_ckpt.model == step.model


def test_consistency_step_composition():
    cfg = get_model_config("debug")
    f = mf.mmdit_forward_flops(cfg, 2, 48, 5)
    bwd = mf.mmdit_backward_flops(cfg, 2, 48, 5)
    cd = mf.consistency_step_flops(cfg, 2, 48, 5, activation_checkpointing=False)
    assert cd.model == f + bwd + 2 * f + f  # student fwd+bwd, teacher cond+uncond, EMA target
    assert mf.consistency_step_flops(cfg, 2, 48, 5, guidance=False, ema_target=False,
                                     activation_checkpointing=False).model == 2 * f + bwd


def test_8b_video_closed_form():
    """The paper's setting: 46,800 visual tokens (latent 13 x 90 x 160, patch 1x2x2) + 512 text tokens."""
    cfg = get_model_config("8b")
    Lx = mf.visual_tokens(cfg, (13, 90, 160))
    assert Lx == 46800
    Lc, D, M, n = 512, 3072, 4 * 3072, 36
    L = Lx + Lc
    full = 2 * L * (4 * D * D + 2 * D * M) + 4 * L * L * D  # a dual-stream block
    last = 2 * Lx * (4 * D * D + 2 * D * M) + 2 * Lc * 2 * D * D + 4 * Lx * L * D  # context-pre-only
    embed = 2 * Lx * 64 * D + 2 * (256 * D + D * D) + 2 * Lc * 4096 * D + 2 * 2 * D * 6 * D
    head = 2 * D * 2 * D + 2 * Lx * D * 64
    assert mf.mmdit_forward_flops(cfg, 1, Lx, Lc) == (n - 1) * full + last + embed + head
    bd = mf.mmdit_forward_flops(cfg, 1, Lx, Lc, breakdown=True)
    assert 0.65 < bd["attention"] / bd["total"] < 0.75  # attention is ~70% of the FLOPs at video length
    assert bd["embed"] + bd["blocks_linear"] + bd["attention"] + bd["head"] == bd["total"]
    assert mf.mmdit_forward_flops(cfg, 3, Lx, Lc) == 3 * bd["total"]


def test_peak_flops_and_mfu():
    assert mf.peak_flops("NVIDIA H200") == 989e12
    assert mf.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert mf.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mf.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert mf.peak_flops("Some Future GPU") is None
    assert mf.peak_flops(torch.device("cpu")) is None
    assert mf.mfu(494.5e12, 989e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mf.mfu(1.0, 0.0)
    r = mf.mfu_report(1.6e15, 2.0, "NVIDIA H200")
    assert r["tflops_per_s"] == pytest.approx(800.0)
    assert r["mfu_datasheet"] == pytest.approx(800 / 989)
    assert r["mfu_measured"] == pytest.approx(1.0)
    r = mf.mfu_report(1.6e15, 2.0, "cpu", num_gpus=4)
    assert r["peak_source"].startswith("assumed") and r["tflops_per_s_per_gpu"] == pytest.approx(200.0)
    assert mf.mfu_report(1e12, 1.0, peak=100e12)["mfu_datasheet"] == pytest.approx(0.01)


def test_t5_encoder_flops():
    # one layer, tiny: 4 projections + attention + gated FFN (3 matrices)
    f = mf.t5_encoder_forward_flops(batch=1, seq_len=3, d_model=4, num_layers=1, num_heads=2, d_kv=2, d_ff=5)
    assert f == 4 * 2 * 3 * 4 * 4 + 4 * 1 * 2 * 3 * 3 * 2 + 3 * 2 * 3 * 4 * 5
