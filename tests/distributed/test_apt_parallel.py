"""D's logits, L_D (with aR1) and their gradients: 1 rank vs TP=2 and vs sequence-parallel=2 (gloo)."""

import copy

import pytest
import torch

from tests.helpers.ranks import run_distributed


def _worker(rank, world, tp, sp, video):

    from megatron_apt.methods.apt import APTConfig, discriminator_loss, generator_loss
    from megatron_apt.models import Discriminator, OneStepGenerator, build_mmdit
    from megatron_apt.parallel import ParallelDims, initialize_model_parallel, parallelize_mmdit
    from megatron_apt.parallel import comm
    from megatron_apt.parallel.state import sp_group

    dims = ParallelDims.from_world(world, tp=tp, sp=sp)
    initialize_model_parallel(dims)
    G = OneStepGenerator(build_mmdit("debug", zero_init=False, seed=0))
    D = Discriminator(build_mmdit("debug", zero_init=False, seed=1))
    D.init_heads(generator=torch.Generator().manual_seed(2))
    Gp = parallelize_mmdit(copy.deepcopy(G), dims)
    Dp = parallelize_mmdit(copy.deepcopy(D), dims)
    g = torch.Generator().manual_seed(7)
    T = 3 if video else 1
    x = torch.randn(2, 4, T, 8, 8, generator=g)
    text = torch.randn(2, 5, 24, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cfg = APTConfig(r1_sigma=0.1, timestep_shift=12.0 if video else 1.0)

    def run(Dm, Gm):
        # every rank of a group draws the same z, t, eps from the same seed
        loss, m = discriminator_loss(Dm, Gm, x, text, mask, cfg=cfg, generator=torch.Generator().manual_seed(11))
        loss.backward()
        gl, _, _ = generator_loss(Dm, Gm, text, mask, shape=x.shape, cfg=cfg,
                                  generator=torch.Generator().manual_seed(12))
        return loss.detach(), m, gl.detach()

    ref_loss, ref_m, ref_gl = run(D, G)
    loss, m, gl = run(Dp, Gp)
    if sp > 1:
        comm.average_gradients(list(Dp.parameters()), sp_group())
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gl, ref_gl, atol=1e-5, rtol=1e-4)
    for k in ("logit_real", "logit_fake", "ar1"):
        torch.testing.assert_close(m[k], ref_m[k], atol=1e-5, rtol=1e-4)
    assert ref_m["ar1"] > 0
    ref_p = dict(D.named_parameters())
    n = 0
    for name, p in Dp.named_parameters():
        rg = ref_p[name].grad
        if getattr(p, "tensor_model_parallel", False):
            rg = rg.chunk(tp, dim=p.partition_dim)[rank % tp]
        torch.testing.assert_close(p.grad, rg, atol=1e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")
        n += 1
    return n


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
@pytest.mark.parametrize("tp,sp", [(2, 1), (1, 2)], ids=["tp2", "sp2"])
def test_discriminator_parallel_matches_single_rank(tp, sp, video):
    n = run_distributed(_worker, 2, tp, sp, video)
    assert n[0] > 50
