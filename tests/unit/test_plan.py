"""The planner (megatron_apt/planning/, tools/plan.py).

Exact: parameter counts; per-rank bytes of ZeRO-3 parameter shards, parameters kept whole, gradient shards,
reduce buckets, fp32 master weights, RMSprop state and the EMA, compared with DeepSpeed's own buffers after
one APT update of the `debug` model on 2 gloo ranks (ZeRO over 2 ranks; tensor parallel 2) and with the
plain torch engine's tensors; the batch arithmetic; FLOPs against models.flops.
Loose: the activation model, checked only against the one measured peak we have (2b APT step on one H200,
58.2 GiB); nothing checks it at 8b scale.
"""

import dataclasses
import os

import pytest
import torch

from megatron_apt import planning as P
from megatron_apt.config.model import DiscriminatorConfig, get_model_config
from tests.helpers.ranks import run_distributed, save_debug_models

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _debug_request(**kw):
    cfg = get_model_config("debug")
    base = dict(stage="apt_image", preset="debug", world=2, global_batch=2, micro_batch=1, precision="fp32",
                sample=P.image_sample(cfg, 16, 8))
    base.update(kw)
    return P.PlanRequest(**base)


# ---- shapes, counts, batch ----------------------------------------------------------------------------
def test_real_sequence_lengths():
    cfg = get_model_config("8b")
    img = P.image_sample(cfg)
    assert img.latent == (16, 1, 128, 128) and img.n_visual == 4096 and img.n_text == 512
    vid = P.video_sample(cfg)
    assert vid.frames == 49 and vid.latent == (16, 13, 90, 160) and vid.n_visual == 46_800


def test_parameter_counts_match_the_models():
    from megatron_apt.models import Discriminator, build_mmdit, count_parameters

    plan = P.make_plan(P.PlanRequest(stage="apt_image", world=256, global_batch=9062))
    assert plan.nets["G"].total == count_parameters(build_mmdit("8b", device="meta")) == 8_218_033_088
    with torch.device("meta"):
        d = Discriminator(build_mmdit("8b", device="meta"))
    assert plan.nets["D"].total == count_parameters(d)
    assert d.head_layers == (16, 26, 36)
    # tensor parallel 2 halves the blocks' attention and MLP matrices and nothing else
    p2 = P.make_plan(P.PlanRequest(stage="apt_image", world=256, tp=2, global_batch=9062))
    g1, g2 = plan.nets["G"], p2.nets["G"]
    assert g2.local < g1.local and g2.largest_block * 2 == pytest.approx(g1.largest_block, rel=1e-3)
    n_tensors = len(list(build_mmdit("8b", device="meta").parameters()))
    assert p2.dims.dp * p2.dims.sp == 128  # the ZeRO group
    assert g2.local / 128 <= g2.partition <= g2.local / 128 + n_tensors  # ceil per tensor


def test_paper_batch_arithmetic():
    img = P.make_plan(P.PlanRequest(stage="apt_image", world=256, micro_batch=4, global_batch=9062))
    counts = img.batch.counts
    assert sum(counts) == 9062 and counts.count(36) == 102 and counts.count(35) == 154
    assert img.batch.micro_steps == 9 and img.time.micro_steps == 9 and img.time.samples_slowest_rank == 36
    vid = P.make_plan(P.PlanRequest(stage="apt_video", world=1024, sp=2, micro_batch=1, global_batch=2048))
    assert vid.dims.dp == 512 and set(vid.batch.counts) == {4} and vid.batch.micro_steps == 4
    assert "9062 = 102 x 36 + 154 x 35 samples over 256 data-parallel ranks" in P.format_plan(img)


def test_step_flops_agree_with_metrics_flops():
    from megatron_apt.models.flops import apt_step_flops, consistency_step_flops, flow_matching_step_flops

    for stage, fn in (("apt_video", apt_step_flops), ("flow", flow_matching_step_flops)):
        plan = P.make_plan(P.PlanRequest(stage=stage, world=8, global_batch=8, optimizer="rmsprop"))
        ref = fn("8b", 1, 46_800, 512)
        assert plan.time.flops_model_per_sample == pytest.approx(ref.model, rel=1e-12)
        assert plan.time.flops_hardware_per_sample == pytest.approx(ref.hardware, rel=1e-12)
    cd = P.make_plan(P.PlanRequest(stage="cd", world=8, global_batch=8))
    assert cd.time.flops_model_per_sample == pytest.approx(consistency_step_flops("8b", 1, 46_800, 512).model)
    # the rate is the measured one: the measured 2b step takes 20.1 s of compute
    m = P.make_plan(P.PlanRequest(stage="apt_video", preset="2b", world=1, global_batch=1, engine="torch"))
    assert m.time.compute_s == pytest.approx(7319.04e12 / 364e12, rel=1e-3)


def test_layout_errors_and_refusal():
    with pytest.raises(P.LayoutError, match="heads"):
        P.make_plan(P.PlanRequest(stage="apt_video", world=1024, tp=1, sp=16, gpus_per_node=16, global_batch=2048))
    with pytest.raises(P.LayoutError, match="node"):
        P.make_plan(P.PlanRequest(stage="apt_video", world=1020, tp=4, sp=3, global_batch=2048))
    with pytest.raises(P.LayoutError, match="global batch"):
        P.make_plan(P.PlanRequest(stage="apt_video", world=4096, global_batch=2048))
    big = P.make_plan(P.PlanRequest(stage="apt_video", world=1024, micro_batch=2, global_batch=2048))
    assert not big.fits and big.memory.peak_phase.name == "D update"
    best = P.search(big.request)
    assert best is not None and best.fits and best.total_gib < big.request.gpu_mem_gib
    # a smaller GPU gets a layout that splits the sequence further
    small = P.search(dataclasses.replace(big.request, gpu_mem_gib=40.0))
    assert small.fits and small.request.tp * small.request.sp >= 2


def test_cli_refuses_with_a_suggestion(capsys):
    from megatron_apt.cli import plan as tool

    assert tool.main(["--stage", "apt_video", "--gpus", "1024", "--micro-batch", "2"]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "suggested: --tp" in out and "parallel.sp=" in out
    assert tool.main(["--config", "examples/configs/apt_image_8b.yaml", "--gpus", "256"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "micro-batch 4" in out and "350 updates" in out
    assert tool.main(["--config", "examples/configs/apt_video_8b.yaml", "--gpus", "1024"]) == 0
    assert tool.main(["--stage", "apt_video", "--gpus", "1000", "--sp", "3"]) == 2  # 1000 % 3 != 0


# ---- exact memory against the engines ------------------------------------------------------------------
def _measure(rank, world, base, run, layouts):
    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.trainer import Trainer

    out = []
    for i, extra in enumerate(layouts):
        cfg = load_config(None, ["stage=apt_image", f"model.init={base}/cd", f"model.teacher={base}/diff",
                                 "data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "data.synthetic_size=4",
                                 "data.synthetic_text_len=8", "precision=fp32", "steps=1", "global_batch=2",
                                 "micro_batch=1", "parallel.engine=deepspeed", f"run_dir={run}/{i}", *extra])
        t = Trainer(cfg)
        t.method.train_step(0, t.micro_batches(0))  # optimizer state exists after one update
        res = {}
        for name, eng in t.method.engines().items():
            z = eng.engine.optimizer

            def nbytes(ts):
                return sum(x.numel() * x.element_size() for x in ts)

            params = list(eng.module.parameters())
            res[name] = {
                "parameters: ZeRO-3 shards": nbytes(z.fp16_partitioned_groups_flat),
                "parameters kept whole (persistence threshold)":
                    sum(p.ds_numel * p.element_size() for p in params if p.ds_persist),
                "gradients: ZeRO-3 shards": nbytes([z.grad_partitions_flat_buffer]),
                "gradients: ZeRO-3 reduce buckets": nbytes([b.buffer for b in z.ipg_buckets.values()]),
                "fp32 master weights (shards)": nbytes(z.fp32_partitioned_groups_flat),
                "optimizer state (shards)": nbytes([v for m in z.fp32_partitioned_groups_flat
                                                    for k, v in z.optimizer.state[m].items() if k != "step"]),
                "EMA (fp32 shards)": nbytes(eng.ema or []),
                "state keys": sorted({k for m in z.fp32_partitioned_groups_flat for k in z.optimizer.state[m]}),
            }
        out.append(res)
    return out


@pytest.mark.distributed
def test_zero3_memory_matches_deepspeed(tmp_path):
    from megatron_apt.models import build_mmdit

    save_debug_models(tmp_path)
    layouts = [
        (dict(tp=1, persistence_threshold=0), ["parallel.zero_persistence_threshold=0"]),  # ZeRO over 2 ranks
        (dict(tp=2, persistence_threshold=100_000), ["parallel.tp=2"]),  # TP 2; every debug tensor persists
    ]
    measured = run_distributed(_measure, 2, str(tmp_path), str(tmp_path / "run"), [x for _, x in layouts],
                               timeout=600)
    for (kw, _), per_rank in zip(layouts, zip(*measured)):
        plan = P.make_plan(_debug_request(**kw))
        for rank_res in per_rank:
            for net in ("G", "D"):
                got = rank_res[net]
                assert got.pop("state keys") == ["square_avg", "step"]  # RMSprop: one state tensor
                static = {i.label: i.per for i in plan.memory.static}
                for label, value in got.items():
                    want = static[label].get(net, 0)  # the EMA is G's only
                    assert value == want, (kw, net, label, value, want)
    # the padding to a multiple of the ZeRO world was exercised: D has tensors of an odd size (its 1-element bias)
    from megatron_apt.models import Discriminator

    with torch.device("meta"):
        d = Discriminator(build_mmdit("debug", device="meta"))
    assert any(p.numel() % 2 for p in d.parameters())


def test_torch_engine_memory_matches():
    """The plain torch engine: whole fp32 parameters, RMSprop's square_avg for every parameter that gets a
    gradient (none for D's unused output head), an fp32 EMA of G; after one real APT update."""
    from megatron_apt.methods.apt import APTConfig, discriminator_loss, generator_loss
    from megatron_apt.models import Discriminator, OneStepGenerator, build_mmdit
    from megatron_apt.trainer.engines import build_engine

    torch.manual_seed(0)
    G = OneStepGenerator(build_mmdit("debug", zero_init=False, seed=1))
    D = Discriminator(build_mmdit("debug", zero_init=False, seed=2))
    D.init_heads()
    kw = dict(kind="torch", optimizer="rmsprop", lr=1e-4, alpha=0.9, eps=1e-8, weight_decay=0.0, betas=(0.9, 0.999),
              grad_clip=0.0, precision="fp32", zero_stage=3, micro_batch=2)
    g, d = build_engine(G, **kw), build_engine(D, **kw)
    g.init_ema()
    x, text = torch.randn(2, 4, 1, 8, 8), torch.randn(2, 8, 24)
    mask = torch.ones(2, 8, dtype=torch.bool)
    cfg = APTConfig()
    loss, _ = discriminator_loss(d, g.raw, x, text, mask, cfg=cfg)
    d.backward(loss)
    d.step()
    D.requires_grad_(False)
    loss, _, _ = generator_loss(d.raw, g, text, mask, shape=x.shape, cfg=cfg)
    g.backward(loss)
    D.requires_grad_(True)
    g.step()

    plan = P.make_plan(_debug_request(world=1, engine="torch"))
    item = {i.label: i for i in plan.memory.static}
    for net, eng in (("G", g), ("D", d)):
        params = sum(p.numel() * 4 for p in eng.module.parameters())
        state = sum(v.numel() * v.element_size() for st in eng.optimizer.state.values() for k, v in st.items()
                    if k != "step")
        assert item["parameters (fp32, whole)"].per[net] == params
        assert item["optimizer state (fp32, whole)"].per[net] == state
    assert item["EMA (fp32, whole)"].per == {"G": sum(e.numel() * 4 for e in g.ema)}
    assert plan.nets["D"].unused > 0  # D's norm_out / proj_out: never reached, never stepped


# ---- loose: activations ---------------------------------------------------------------------------------
def test_activation_model_against_the_measured_2b_step():
    """The one measured peak: the 2b APT step (plain torch, fp32 parameters + bf16 autocast, RMSprop for G
    and D, no EMA, micro-batch 1, 46,800 + 512 tokens, activation checkpointing) peaked at 58.2 GiB
    allocated on one H200. The planner's allocated estimate (no CUDA context or fragmentation allowance,
    which max_memory_allocated does not see) must be close and not below it."""
    cfg = get_model_config("2b")
    plan = P.make_plan(P.PlanRequest(stage="apt_video", preset="2b", world=1, global_batch=1, engine="torch",
                                     ema=False, sample=P.video_sample(cfg)))
    allocated = (plan.memory.static_bytes + plan.memory.peak_phase.bytes) / P.GIB
    assert 58.2 <= allocated <= 58.2 * 1.15, allocated


# ---- pipeline engine (parallel.engine=pipeline) ---------------------------------------------------------
def _pipe_request(**kw):
    base = dict(stage="apt_image", engine="pipeline", tp=1, micro_batch=1)
    base.update(kw)
    return P.PlanRequest(**base)


def test_pipeline_stage_counts_sum_to_the_networks():
    """Each stage is the trainer's own cut (make_pipeline_stage on a meta network); over the stages every
    tensor-parallel-local parameter is counted once, D's carried never-run output head included."""
    plan = P.make_plan(_pipe_request(world=64, tp=2, pp=4, global_batch=64))
    assert plan.dims.pp == 4 and plan.dims.dp == 8 and len(plan.stages) == 4
    cfg = get_model_config("8b")
    whole = P.build_networks("apt_image", cfg, DiscriminatorConfig())
    for net in ("G", "D"):
        ref = P.count_network(whole[net], net, 2, 1, 0)
        assert sum(st.nets[net].local for st in plan.stages) == ref.local == plan.nets[net].local
        assert sum(st.nets[net].unused for st in plan.stages) == ref.unused
        assert ref.local < ref.total  # tensor parallel split the blocks
    assert plan.nets["D"].unused > 0 and plan.stages[-1].nets["D"].unused == plan.nets["D"].unused
    # G's 36 blocks and D's blocks up to its deepest head, each split evenly and in order
    assert [list(st.blocks["G"]) for st in plan.stages] == [list(range(9 * s, 9 * s + 9)) for s in range(4)]
    assert [b for st in plan.stages for b in st.blocks["D"]] == list(range(max(whole["D"].head_layers)))
    # the stage FLOPs add up to the pass FLOPs: model FLOPs as models.flops counts them, hardware FLOPs plus
    # the generator step's extra G forward that only the pipeline layout runs
    from megatron_apt.models.flops import apt_step_flops, mmdit_forward_flops

    ref = apt_step_flops("8b", 1, 4096, 512)
    assert plan.time.flops_model_per_sample == pytest.approx(ref.model, rel=1e-12)
    assert plan.time.flops_hardware_per_sample == pytest.approx(ref.hardware + mmdit_forward_flops(cfg, 1, 4096, 512),
                                                                rel=1e-12)


def test_pipeline_zero1_optimizer_state_shards_over_dp():
    small = P.make_plan(_pipe_request(world=16, pp=4, global_batch=64))  # dp 4
    big = P.make_plan(_pipe_request(world=32, pp=4, global_batch=64))  # dp 8
    assert (small.dims.dp, big.dims.dp) == (4, 8)
    for s in range(4):
        a, b = small.stages[s].memory, big.stages[s].memory
        assert a.item("parameters (fp32, whole per stage)") == b.item("parameters (fp32, whole per stage)") > 0
        assert a.item("EMA (fp32, whole per stage)") == b.item("EMA (fp32, whole per stage)")
        label = "optimizer state (ZeRO-1 shard over dp)"
        opt_a, opt_b = a.item(label), b.item(label)
        assert opt_b / opt_a == pytest.approx(0.5, rel=0.05)
        for net in ("G", "D"):  # whole parameters per rank: at least the average, at most one tensor more
            n = big.stages[s].nets[net]
            assert (n.local - n.unused) / 8 <= n.zero1_shard <= (n.local - n.unused) / 8 + n.largest_block
    # RMSprop keeps one state tensor, AdamW two
    adam = P.make_plan(_pipe_request(world=32, pp=4, global_batch=64, optimizer="adamw"))
    label = "optimizer state (ZeRO-1 shard over dp)"
    assert adam.stages[0].memory.item(label) == 2 * big.stages[0].memory.item(label)


def test_pipeline_bubble():
    """One 1F1B call takes m + pp - 1 slots of the slowest stage: the compute of m micro-steps scales as
    (m + pp - 1) with pp = 2 and as m with pp = 1, and the bubble is (pp - 1) / (m + pp - 1) of each call."""
    def plan(pp, m):
        return P.make_plan(_pipe_request(world=2 * pp, pp=pp, global_batch=2 * m))  # dp 2: m samples per rank

    p4, p8 = plan(2, 4), plan(2, 8)
    assert (p4.time.micro_steps, p8.time.micro_steps) == (4, 8)
    assert p8.time.compute_s / p4.time.compute_s == pytest.approx((8 + 1) / (4 + 1), rel=1e-9)
    whole4, whole8 = plan(1, 4), plan(1, 8)
    assert whole8.time.compute_s / whole4.time.compute_s == pytest.approx(8 / 4, rel=1e-9)
    assert whole4.time.bubble_s == whole4.time.p2p_s == 0
    for p in (p4, p8):
        t, m = p.time, p.time.micro_steps
        assert t.bubble_fraction == pytest.approx(1 / (m + 1))
        # the bubble's share of the slot work (compute, TP, stage-to-stage p2p) is the bubble fraction
        slots = sum(r["compute_s"] + r["tp_sp_s"] + r["p2p_s"] for r in t.passes)
        assert t.bubble_s == pytest.approx(t.bubble_fraction * slots, rel=1e-9)
        base = t.compute_s + t.tpsp_s + t.p2p_s + t.dp_allreduce_s + t.zero1_broadcast_s
        assert t.per_update_s == pytest.approx(base * (1 + P.OVERHEAD), rel=1e-9)
        assert t.p2p_s > 0 and t.dp_allreduce_s > 0 and t.zero1_broadcast_s > 0
    # two stages share the work: without the bubble each takes a little over half of one whole-model slot
    busy = p8.time.compute_s * 8 / 9
    assert 0.5 < busy / whole8.time.compute_s < 0.6


def test_pipeline_layout_errors():
    with pytest.raises(P.LayoutError, match="sequence parallel"):
        P.make_plan(_pipe_request(stage="apt_video", world=1024, sp=2, pp=2, global_batch=2048))
    for engine in ("deepspeed", "torch"):
        with pytest.raises(P.LayoutError, match="needs engine pipeline"):
            P.make_plan(_pipe_request(stage="apt_video", world=1024, pp=2, engine=engine, global_batch=2048))
    with pytest.raises(P.LayoutError, match="cannot be split"):
        P.make_plan(_pipe_request(world=37 * 2, pp=37, global_batch=64))
    with pytest.raises(P.LayoutError, match="pipeline_layers"):
        P.make_plan(_pipe_request(world=8, pp=4, pipeline_layers=(9, 9, 9), global_batch=64))


def test_pipeline_cli(capsys):
    from megatron_apt.cli import plan as tool

    rc = tool.main(["--stage", "apt_video", "--gpus", "1024", "--engine", "pipeline", "--pp", "4", "--tp", "2",
                    "--micro-batch", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "pipeline 4 stages, 1F1B, ZeRO-1 optimizer state over dp = 128 ranks" in out
    assert "memory per GPU on the heaviest stage (stage 0)" in out and "bubble" in out and "per update" in out
