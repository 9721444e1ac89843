"""TP=2 and sequence-parallel=2 (2 gloo ranks) against one rank: outputs, input gradients and parameter
gradients of the debug MMDiT, on images and videos, with padded text."""

import copy

import pytest
import torch

from tests.helpers.ranks import run_distributed


def _inputs(video: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    T = 3 if video else 1
    x = torch.randn(2, 4, T, 8, 8, generator=g)
    t = torch.rand(2, generator=g)
    text = torch.randn(2, 5, 24, generator=g)  # 5 text tokens: odd, so sequence parallel must pad
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    w = torch.randn(2, 4, T, 8, 8, generator=g)
    return x, t, text, mask, w


def _fwd_bwd(model, x, t, text, mask, w):
    x = x.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    out = model(x, t, text, mask)
    (out * w).sum().backward()
    return out.detach(), x.grad, text.grad


def _parity_worker(rank, world, tp, sp, video):
    from megatron_apt.models import build_mmdit
    from megatron_apt.parallel import ParallelDims, initialize_model_parallel, parallelize_mmdit
    from megatron_apt.parallel import comm
    from megatron_apt.parallel.state import sp_group

    dims = ParallelDims.from_world(world, tp=tp, sp=sp)
    initialize_model_parallel(dims)
    ref = build_mmdit("debug", zero_init=False, seed=3)
    model = parallelize_mmdit(copy.deepcopy(ref), dims)
    x, t, text, mask, w = _inputs(video)
    ref_out, ref_xg, ref_tg = _fwd_bwd(ref, x, t, text, mask, w)
    out, xg, tg = _fwd_bwd(model, x, t, text, mask, w)
    # gradients are averaged over the sequence-parallel group (the DP x SP convention, see parallel.comm)
    params = list(model.parameters())
    comm.average_gradients(params, sp_group())
    xg, tg = xg.clone(), tg.clone()
    if sp > 1:
        import torch.distributed as dist

        for g in (xg, tg):
            dist.all_reduce(g, group=sp_group())
            g.div_(sp)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(xg, ref_xg, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tg, ref_tg, atol=1e-5, rtol=1e-4)
    ref_grads = dict(ref.named_parameters())
    tp_rank = rank % tp
    checked = 0
    for name, p in model.named_parameters():
        rg = ref_grads[name].grad
        if getattr(p, "tensor_model_parallel", False):
            rg = rg.chunk(tp, dim=p.partition_dim)[tp_rank]
        assert p.grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(p.grad, rg, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        checked += 1
    return checked


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
@pytest.mark.parametrize("tp,sp", [(2, 1), (1, 2)], ids=["tp2", "sp2"])
def test_parallel_matches_single_rank(tp, sp, video):
    checked = run_distributed(_parity_worker, 2, tp, sp, video)
    assert checked[0] > 50


def _keep_attention_worker(rank, world, tp, sp):
    from megatron_apt.models import build_mmdit
    from megatron_apt.parallel import ParallelDims, initialize_model_parallel, parallelize_mmdit

    dims = ParallelDims.from_world(world, tp=tp, sp=sp)
    initialize_model_parallel(dims)
    ref = build_mmdit("debug", zero_init=False, seed=3)
    block = parallelize_mmdit(copy.deepcopy(ref), dims, activation_checkpointing="block")
    keep = parallelize_mmdit(copy.deepcopy(ref), dims, activation_checkpointing="attention")
    inputs = _inputs(True)
    for a, b in zip(_fwd_bwd(keep, *inputs), _fwd_bwd(block, *inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads = dict(block.named_parameters())
    return max(float((p.grad - grads[n].grad).abs().max()) for n, p in keep.named_parameters() if p.grad is not None)


@pytest.mark.distributed
@pytest.mark.parametrize("tp, sp", [(2, 1), (1, 2)], ids=["tp2", "sp2"])
def test_keeping_attention_outputs_under_tp_and_sp_gives_whole_block_checkpointings_gradients(tp, sp):
    """checkpoint_scope=attention recomputes the tensor-parallel all-reduces and the Ulysses all-to-alls around
    the kept attention kernel: outputs, input and parameter gradients equal whole-block checkpointing's."""
    assert run_distributed(_keep_attention_worker, 2, tp, sp, timeout=300) == [0.0, 0.0]
