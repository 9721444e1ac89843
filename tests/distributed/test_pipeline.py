"""Pipeline parallel on gloo ranks: stages of the MMDiT, the generator and the discriminator run by
megatron-core's 1F1B schedule give the single model's loss and gradients; APT / CD / flow training under
PP=2 (and PP=2 x DP=2 with ZeRO-1, PP=2 x TP=2) matches one rank step for step; a PP=2 checkpoint
consolidates (PP -> 1) to the single-rank weights and resumes bit-identically."""

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.ranks import run_distributed, run_tool, save_debug_models, train_worker

os.environ.setdefault("DS_ACCELERATOR", "cpu")

COMMON = ["data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "data.synthetic_size=32", "precision=fp32",
          "log_every=1", "global_batch=4", "micro_batch=1", "parallel.activation_checkpointing=false"]
PP2 = ["parallel.engine=pipeline", "parallel.pp=2"]
REF = ["parallel.engine=torch"]
METRICS = ("loss", "d_loss", "g_loss", "ar1", "logit_gap", "grad_norm", "d_grad_norm", "g_grad_norm")


# ------------------------------------------------------------------------------------------------------
# stage split vs the whole model
# ------------------------------------------------------------------------------------------------------
def _config(name):
    from megatron_apt.config.model import get_model_config

    if name == "sd3":  # per-block adaLN, sin-cos positions, pooled text, context-pre-only last block
        return get_model_config("sd3.5-large", hidden_size=32, num_layers=4, num_heads=4, text_dim=24, pooled_dim=16,
                                pos_embed_max_size=16, pos_embed_base_size=8, in_channels=4)
    return get_model_config("debug")


def _items(cfg, n, video, seed=1):
    from megatron_apt.parallel.pipeline import PipeItem

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        B = 2 + (k % 2)  # micro-batches of different sizes (ragged exact batches)
        x = torch.randn(B, cfg.in_channels, 2 if video else 1, 8, 8, generator=g)
        text = torch.randn(B, 6, cfg.text_dim, generator=g)
        mask = torch.ones(B, 6, dtype=torch.bool)
        mask[1, 4:] = False  # padded text in one sample
        pooled = torch.randn(B, cfg.pooled_dim, generator=g) if cfg.pooled_dim else None
        y = torch.randn(B, *x.shape[1:], generator=g)
        out.append(PipeItem(x, torch.rand(B, generator=g), text, mask, {"y": y}, pooled))
    return out


def _split_parity_worker(rank, world, name, kind, layers, video):
    from megatron_apt.config.model import DiscriminatorConfig
    from megatron_apt.models import build_mmdit
    from megatron_apt.models.discriminator import Discriminator, OneStepGenerator
    from megatron_apt.parallel import ParallelDims, initialize_model_parallel
    from megatron_apt.parallel.pipeline import PipelineRunner, make_pipeline_stage

    initialize_model_parallel(ParallelDims(tp=1, sp=1, dp=1, pp=world))
    cfg = _config(name)

    def build():
        m = build_mmdit(cfg, zero_init=False, seed=3)
        if kind == "generator":
            return OneStepGenerator(m)
        if kind == "discriminator":
            d = Discriminator(m, DiscriminatorConfig())
            d.init_heads(generator=torch.Generator().manual_seed(5))
            return d
        return m

    ref, stage = build(), make_pipeline_stage(build(), rank, world, layers)
    items = _items(cfg, 3, video)

    def loss_of(out, item):
        if kind == "discriminator":
            return (torch.nn.functional.softplus(-out) * torch.arange(1, out.shape[0] + 1)).sum()
        return (out - item.extra["y"]).pow(2).mean() * 10

    res = PipelineRunner().run(stage, items, lambda out, item: (loss_of(out, item), {"l": float(loss_of(out, item))}))
    total = 0.0
    for it in items:
        if kind == "generator":
            out = ref(it.x, it.text, it.text_mask, it.pooled)
        else:
            out = ref(it.x, it.t, it.text, it.text_mask, it.pooled)
        loss = loss_of(out, it)
        loss.backward()
        total += float(loss)
    ref_grads = dict(ref.named_parameters())
    owned, compared = 0, 0
    for n, p in stage.named_parameters():
        owned += 1
        r = ref_grads[n].grad
        if p.grad is None:
            assert r is None or float(r.abs().max()) == 0.0, f"{n}: no gradient on the stage, the whole model has one"
            continue
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
        compared += 1
    heads = sorted(stage.heads) if kind == "discriminator" else []
    return {"losses": [r["l"] for r in res], "total": total, "owned": owned, "compared": compared, "heads": heads,
            "names": sorted(n for n, _ in stage.named_parameters()), "all": sorted(ref_grads)}


@pytest.mark.parametrize("name,kind,layers,video", [
    ("debug", "velocity", None, True),
    ("debug", "discriminator", None, False),  # heads at layers 2 | 3, 4: in both stages
    ("debug", "generator", [1, 3], True),  # an uneven split
    ("sd3", "velocity", [3, 1], False),
])
def test_stages_match_whole_model(name, kind, layers, video):
    a, b = run_distributed(_split_parity_worker, 2, name, kind, layers, video, timeout=300)
    assert b["losses"] and not a["losses"]  # the loss is formed on the last stage only
    assert sum(b["losses"]) == pytest.approx(a["total"], rel=1e-5)
    # every parameter lives on exactly one stage, under its full-model name
    assert sorted(a["names"] + b["names"]) == a["all"]
    assert a["compared"] > 10 and b["compared"] > 10
    if kind == "discriminator":
        assert a["heads"] and b["heads"]


# ------------------------------------------------------------------------------------------------------
# training under PP vs one rank
# ------------------------------------------------------------------------------------------------------
def _all_stages(rank, world, base, run, layout, steps):
    out = {}
    for stage, extra in [("apt_image", [f"model.init={base}/cd", f"model.teacher={base}/diff"]),
                         ("cd", [f"model.init={base}/diff", "cd.num_steps=4"]),
                         ("flow", [f"model.init={base}/diff"])]:
        out[stage] = train_worker(rank, world, COMMON + layout + extra + [f"stage={stage}", f"run_dir={run}/{stage}",
                                                                     f"steps={steps}", "save_every=2"])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Model dirs, and the single-rank reference (plain torch engine) of each stage."""
    base = tmp_path_factory.mktemp("pp")
    save_debug_models(base)
    ref = run_distributed(_all_stages, 1, str(base), str(base / "ref"), REF, 3, timeout=600)[0]
    return base, ref


def _same_history(got, want):
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for g, w in zip(got, want):
        for k in METRICS:
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-7), (k, g["step"], g[k], w[k])


def _same_exports(a_dir, b_dir, parts, atol=1e-6):
    for part in parts:
        a = load_file(str(a_dir / part / "model.safetensors"))
        b = load_file(str(b_dir / part / "model.safetensors"))
        assert set(a) == set(b), part
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=lambda m: f"{part} {k}: {m}")


APT_PARTS = ("generator", "generator_ema", "discriminator")


def test_pp2_training_matches_one_rank(runs):
    """APT (D steps with aR1, G steps through D), CD and flow: 3 steps each under PP=2."""
    base, ref = runs
    got = run_distributed(_all_stages, 2, str(base), str(base / "pp2"), PP2 + ["sample_every=3"], 3, timeout=600)[0]
    for stage in ("apt_image", "cd", "flow"):
        _same_history(got[stage], ref[stage])
        assert (base / "pp2" / stage / "samples" / "step-00000003.png").is_file()  # written by the last stage
    _same_exports(base / "pp2/apt_image/export", base / "ref/apt_image/export", APT_PARTS)
    _same_exports(base / "pp2/cd/export", base / "ref/cd/export", ("model", "model_ema"))
    # the generator really moved (the comparison is not between two copies of the initial weights)
    g = load_file(str(base / "pp2/apt_image/export/generator/model.safetensors"))
    init = load_file(str(base / "cd/model.safetensors"))
    assert max(float((g[k] - init[k]).abs().max()) for k in g) > 1e-5


def _apt_only(rank, world, base, run, layout):
    return train_worker(rank, world, COMMON + [f"model.init={base}/cd", f"model.teacher={base}/diff", "stage=apt_image",
                                         f"run_dir={run}", "steps=3", "save_every=2"] + layout)


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["global_batch=3"]], ids=["pp2_tp2", "pp2_dp2_zero1_ragged"])
def test_pp2_on_four_ranks_matches_one_rank(runs, layout):
    """PP=2 x TP=2, and PP=2 x DP=2 with ZeRO-1 on a global batch of 3 (2 + 1 samples: the second
    data-parallel rank runs a weight-0 micro-step), against one rank with the same global batch."""
    base, ref = runs
    tp = "parallel.tp=2" in layout
    run = base / ("four_" + ("tp" if tp else "dp"))
    got = run_distributed(_apt_only, 4, str(base), str(run), PP2 + layout, timeout=600)[0]
    if tp:
        want, want_dir = ref["apt_image"], base / "ref/apt_image/export"
    else:
        want = run_distributed(_apt_only, 1, str(base), str(base / "ref_b3"), REF + layout, timeout=600)[0]
        want_dir = base / "ref_b3/export"
    _same_history(got, want)
    _same_exports(run / "export", want_dir, APT_PARTS)
    if not tp:  # DP=2: each data-parallel rank of a stage holds part of the optimizer state (ZeRO-1)
        ck = sorted((run / "checkpoints").glob("step-*"))[-1]
        for stage_ranks in ((0, 1), (2, 3)):
            held = []
            for r in stage_ranks:
                t = load_file(str(ck / f"rank{r:05d}.safetensors"))
                params = {k for k in t if k.startswith("G.param.")}
                held.append({k for k in t if k.startswith("G.opt.") and k.endswith(".square_avg")})
                assert 0 < len(held[-1]) < len(params)
            assert sum(len(h) for h in held) == len(params)  # together: every parameter's state, once


def test_pp2_checkpoint_consolidates_to_pp1_and_resumes(runs, tmp_path):
    base, ref = runs
    run = tmp_path / "cut"
    run_distributed(_apt_only, 2, str(base), str(run), PP2 + ["steps=2"], timeout=600)
    ck = run / "checkpoints" / "step-00000002"
    # PP=2 -> one consolidated model directory, checked against every rank file (--verify)
    assert run_tool("convert_checkpoint", "consolidate", "--input", ck, "--output", tmp_path / "pp1", "--verify") == 0
    from megatron_apt.checkpoint.training import TrainingCheckpoint

    class Count:  # the progress bar's total is what consolidation reads, stage by stage
        n = 0

        def update(self, k):
            Count.n += k

    tc = TrainingCheckpoint(ck)
    tc.bar = Count()
    for e in tc.engines:
        tc.state_dict(e)
    assert Count.n == sum(tc.planned_reads(e) for e in tc.engines) > 0
    ref2 = base / "ref_step2"
    run_distributed(_apt_only, 1, str(base), str(ref2), REF + ["steps=2"], timeout=600)
    _same_exports(tmp_path / "pp1", ref2 / "export", APT_PARTS)
    # resume: the same command with more steps continues bit-identically to an uninterrupted PP=2 run
    rest = run_distributed(_apt_only, 2, str(base), str(run), PP2, timeout=600)[0]
    assert [h["step"] for h in rest] == [3]
    full = run_distributed(_apt_only, 2, str(base), str(tmp_path / "full"), PP2, timeout=600)[0]
    for k in METRICS:
        if k in full[-1]:
            assert rest[-1][k] == full[-1][k], k
    for part in APT_PARTS:
        a = load_file(str(run / "export" / part / "model.safetensors"))
        b = load_file(str(tmp_path / "full" / "export" / part / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    # a PP=2 checkpoint does not resume under another layout
    with pytest.raises(RuntimeError, match="layout"):
        run_distributed(_apt_only, 1, str(base), str(run), ["parallel.engine=pipeline", "steps=4"], timeout=600)
