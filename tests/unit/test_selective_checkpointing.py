"""Selective activation checkpointing (parallel.checkpoint_scope=mlp or attention): the same gradients as no
checkpointing and as whole-block checkpointing; with 'mlp' only the MLPs run twice, with 'attention' everything
but the attention kernel; the tensors kept for backward lie between the two; the FLOP counts and the planner
account for it."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_apt.config.train import checkpointing, load_config
from megatron_apt.models import build_mmdit
from megatron_apt.models import flops as mf
from megatron_apt.models.mmdit import MLP, AttentionCore
from megatron_apt.parallel.parallelize import _attention_ops, parallelize_mmdit
from megatron_apt.parallel.state import ParallelDims


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 2, 8, 8, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 24, generator=g),
            torch.ones(2, 5, dtype=torch.bool))


class _AttentionKernels(TorchDispatchMode):
    """Counts the attention kernels that run (selective checkpointing answers a kept one from its cache, inside
    this mode, so a kept kernel is not counted again)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in _attention_ops()
        return func(*args, **(kwargs or {}))


def _run(model, scope, compile=False):
    """Gradients of one forward + backward, the calls of each MLP and attention core (module calls: a kept
    attention kernel's core still runs its Python), the attention kernels run in the backward pass, and the
    bytes of the distinct tensors autograd kept for the backward pass."""
    m = copy.deepcopy(model)
    if scope:
        parallelize_mmdit(m, ParallelDims(), activation_checkpointing=scope, compile=compile)
    calls = {"mlp": 0, "attention": 0}
    for mod in m.modules():  # an MLP's first layer (a checkpointed module's recompute bypasses its own hooks)
        if isinstance(mod, (MLP, AttentionCore)):
            key = "mlp" if isinstance(mod, MLP) else "attention"
            (mod.fc1 if key == "mlp" else mod).register_forward_hook(
                lambda *_, k=key: calls.__setitem__(k, calls[k] + 1))
    kept = {}

    def pack(t):
        kept[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    x, t, text, mask = _inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(x, t, text, mask)
    forward_calls = dict(calls)
    with _AttentionKernels() as kernels:
        out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    recomputed = {k: calls[k] - forward_calls[k] for k in calls}
    return grads, recomputed, kernels.n, sum(kept.values())


def test_selective_scopes_recompute_what_they_say_with_the_same_gradients():
    model = build_mmdit("debug", zero_init=False, seed=3)
    n_blocks = len(model.blocks)
    n_mlps = sum((b.x_mlp is not None) + (b.c_mlp is not None) for b in model.blocks)
    none, rec_none, att_none, kept_none = _run(model, False)
    block, rec_block, att_block, kept_block = _run(model, "block")
    mlp, rec_mlp, att_mlp, kept_mlp = _run(model, "mlp")
    attn, rec_attn, att_attn, kept_attn = _run(model, "attention")
    assert rec_none == {"mlp": 0, "attention": 0}
    assert rec_block == {"mlp": n_mlps, "attention": n_blocks}
    assert rec_mlp == {"mlp": n_mlps, "attention": 0}  # attention outputs kept, not recomputed
    assert rec_attn == {"mlp": n_mlps, "attention": n_blocks}  # the whole block's Python runs again ...
    assert att_none == att_mlp == att_attn == 0 and att_block == n_blocks  # ... but not the attention kernel
    assert none.keys() == block.keys() == mlp.keys() == attn.keys()
    for k in none:
        torch.testing.assert_close(mlp[k], none[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(block[k], none[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attn[k], none[k], rtol=1e-5, atol=1e-6)
    # what the backward keeps: whole-block checkpointing least, then MLP-only, then nothing recomputed. 'attention'
    # keeps the block inputs as 'block' does, seen by the saved-tensor hooks, plus the attention outputs, which
    # torch's selective checkpointing holds in a cache of its own (the kernel count above shows they are kept)
    assert kept_block == kept_attn < kept_mlp < kept_none


def test_attention_scope_compiled_keeps_the_attention_and_the_gradients():
    """The same under torch.compile (AOT autograd applies the selective policy to the compiled graph; the
    'aot_eager' backend runs that graph without code generation)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = build_mmdit("debug", zero_init=False, seed=3)
    none, _, _, _ = _run(model, False)
    _, _, att_block, _ = _run(model, "block", compile="aot_eager")
    torch._dynamo.reset()
    comp, _, att_comp, _ = _run(model, "attention", compile="aot_eager")
    assert att_block == len(model.blocks) and att_comp == 0
    for k in none:
        torch.testing.assert_close(comp[k], none[k], rtol=1e-5, atol=1e-6)


def test_scope_in_config_flops_and_planner():
    with pytest.raises(ValueError, match="parallel.checkpoint_scope must be 'block' or 'mlp' or 'attention'"):
        load_config(None, ["data.synthetic=true", "parallel.checkpoint_scope=mlps"])
    assert checkpointing(True) == "block" and checkpointing(True, "mlp") == "mlp" and checkpointing(False, "mlp") is False
    # 'attention' keeps PyTorch's fused attention kernels only, and cannot hold ZeRO-3's gathering of blocks that
    # are no leaf modules (the discriminator's) inside its region: both are refused in one line
    base = ["data.synthetic=true", "parallel.checkpoint_scope=attention"]
    with pytest.raises(ValueError, match="model.attention_backend=math runs none"):
        load_config(None, base + ["parallel.engine=torch", "model.attention_backend=math"])
    with pytest.raises(ValueError, match="the discriminator's blocks are not ZeRO-3 leaf modules"):
        load_config(None, base + ["stage=apt_video"])
    with pytest.raises(ValueError, match="every model's blocks are not ZeRO-3 leaf modules"):
        load_config(None, base + ["stage=flow", "parallel.zero3_leaf_blocks=false"])
    for ok in (["stage=apt_video", "parallel.engine=torch"], ["stage=flow"],
               ["stage=apt_video", "parallel.activation_checkpointing=false"]):
        load_config(None, base + ok)
    # the recompute of 'mlp' is exactly the blocks' MLP forward FLOPs
    cfg, B, Lx, Lt = "2b", 1, 4096, 512
    ops = mf.mmdit_ops(cfg, B, Lx, Lt, weights_grad=True)
    mlp_fwd = sum(o.forward for o in ops if "_mlp." in o.name)
    assert mf.flow_matching_step_flops(cfg, B, Lx, Lt, activation_checkpointing="mlp").recompute == mlp_fwd
    # the recompute of 'attention' is the blocks' forward FLOPs but their attention cores'
    blocks_fwd = sum(o.forward for o in ops if o.in_blocks)
    attn_core = sum(o.forward for o in ops if o.in_blocks and o.kind == "attention")
    assert mf.flow_matching_step_flops(cfg, B, Lx, Lt, activation_checkpointing="attention").recompute == (
        blocks_fwd - attn_core) and attn_core > 0
    full = mf.flow_matching_step_flops(cfg, B, Lx, Lt, activation_checkpointing=True)
    assert full.recompute > mlp_fwd and full.model == mf.flow_matching_step_flops(
        cfg, B, Lx, Lt, activation_checkpointing="mlp").model
    # the planner: activation memory and step time between no checkpointing and whole blocks
    from megatron_apt.planning import PlanRequest, make_plan

    plans = {ac: make_plan(PlanRequest(stage="apt_video", preset="2b", world=8, tp=1, sp=8, micro_batch=1,
                                       global_batch=64, activation_checkpointing=ac))
             for ac in (False, "block", "mlp", "attention")}
    act = {k: sum(i.bytes for ph in p.memory.phases for i in ph.items if i.label.startswith("activations:"))
           for k, p in plans.items()}
    assert act["block"] < act["attention"] < act["mlp"] < act[False]
    t = {k: p.time.per_update_s for k, p in plans.items()}
    assert t[False] < t["mlp"] < t["block"] and t[False] < t["attention"] < t["block"]
