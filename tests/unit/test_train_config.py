"""Training config: YAML + dotted overrides, clear errors, the exact-batch plan, the dry run."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_apt.config.train import load_config
from megatron_apt.trainer.batching import per_sample_randn, plan_batch

ROOT = Path(__file__).resolve().parents[2]


def test_overrides_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stage: apt_video\noptim:\n  lr: 3.0e-6\napt:\n  timestep_shift: 12\ndata:\n  synthetic: true\n")
    cfg = load_config(f, ["optim.lr=1e-5", "parallel.tp=2", "apt.use_r1=false", "model.head_layers=[1,2]"])
    assert cfg.stage == "apt_video" and cfg.optim.lr == 1e-5 and cfg.parallel.tp == 2
    assert cfg.apt.use_r1 is False and cfg.apt.timestep_shift == 12 and cfg.model.head_layers == [1, 2]


def test_unknown_keys_and_bad_values_are_named():
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'.*lr"):
        load_config(None, ["data.synthetic=true", "optim.lrr=1"])
    with pytest.raises(ValueError, match="cannot parse optim.lr"):
        load_config(None, ["data.synthetic=true", "optim.lr=fast"])
    with pytest.raises(ValueError, match="unknown stage"):
        load_config(None, ["data.synthetic=true", "stage=gan"])
    with pytest.raises(ValueError, match="data.path is required"):
        load_config(None, [])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_exact_batch_plan():
    p = plan_batch(7, 2, 2)
    assert p.counts == (4, 3) and p.micro_steps == 2
    assert p.micro_batches(0) == [(0, 2), (2, 4)] and p.micro_batches(1) == [(4, 6), (6, 7)]
    p = plan_batch(9062, 256, 8)  # the paper's image batch on 256 GPUs
    assert sum(p.counts) == 9062 and max(p.counts) - min(p.counts) == 1 and p.micro_steps == 5
    p = plan_batch(5, 2, 2)  # rank 1 has 2 samples: its second micro-step is empty (weight 0)
    assert p.micro_batches(1) == [(3, 5), (5, 5)]
    with pytest.raises(ValueError, match="cannot be formed over 4 data-parallel ranks"):
        plan_batch(3, 4, 1)


def test_per_sample_noise_does_not_depend_on_grouping():
    a = per_sample_randn((2, 3), 1, 5, "z", [0, 1, 2, 3])
    b = per_sample_randn((2, 3), 1, 5, "z", [2, 3])
    assert (a[2:] == b).all() and not (a[0] == a[1]).all()


def test_dry_run_prints_layout_and_batch():
    r = subprocess.run([sys.executable, str(ROOT / "pretrain_apt.py"), "--dry-run", "data.synthetic=true",
                        "global_batch=9062", "micro_batch=8"], capture_output=True, text=True,
                       env={**__import__("os").environ, "WORLD_SIZE": "256"})
    assert r.returncode == 0, r.stderr
    assert "global batch 9062 = 256 data-parallel ranks x 35-36 samples, 5 micro-steps" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "pretrain_apt.py"), "--dry-run", "data.synthetic=true",
                        "parallel.tp=3"], capture_output=True, text=True, env={**__import__("os").environ, "WORLD_SIZE": "4"})
    assert r.returncode == 2 and "not divisible" in r.stderr


def test_pipeline_layout_is_validated():
    ok = load_config(None, ["data.synthetic=true", "parallel.engine=pipeline", "parallel.pp=4",
                            "parallel.pipeline_layers=[8,10,10,8]"])
    assert ok.parallel.pp == 4 and ok.parallel.pipeline_layers == [8, 10, 10, 8] and ok.parallel.zero1
    with pytest.raises(ValueError, match="needs parallel.engine=pipeline"):
        load_config(None, ["data.synthetic=true", "parallel.pp=2"])  # ZeRO-3 engines cannot be staged
    with pytest.raises(ValueError, match="sequence parallel"):
        load_config(None, ["data.synthetic=true", "parallel.engine=pipeline", "parallel.pp=2", "parallel.sp=2"])
    with pytest.raises(ValueError, match="one block count per"):
        load_config(None, ["data.synthetic=true", "parallel.engine=pipeline", "parallel.pp=2",
                           "parallel.pipeline_layers=[1,2,1]"])


def test_pipeline_layer_split():
    from megatron_apt.parallel.pipeline import stage_layer_ranges

    assert stage_layer_ranges(36, 4) == [range(0, 9), range(9, 18), range(18, 27), range(27, 36)]
    assert stage_layer_ranges(38, 4) == [range(0, 10), range(10, 20), range(20, 29), range(29, 38)]
    assert stage_layer_ranges(36, 2, [16, 20]) == [range(0, 16), range(16, 36)]
    with pytest.raises(ValueError, match="summing to 36"):
        stage_layer_ranges(36, 2, [16, 19])
    with pytest.raises(ValueError, match="cannot be split"):
        stage_layer_ranges(3, 4)


def test_pipeline_stages_keep_full_model_names():
    """Cutting G and D (8b shapes, on the meta device) into 4 stages loses and duplicates no parameter; D's
    heads sit on the stages of their tapped layers (16, 26, 36 of 36)."""
    import torch

    from megatron_apt.config.model import DiscriminatorConfig, get_model_config
    from megatron_apt.models import Discriminator, MMDiT, OneStepGenerator
    from megatron_apt.parallel.pipeline import make_pipeline_stage

    cfg = get_model_config("8b")
    for build in (lambda: OneStepGenerator(MMDiT(cfg)), lambda: Discriminator(MMDiT(cfg), DiscriminatorConfig())):
        with torch.device("meta"):
            whole = sorted(n for n, _ in build().named_parameters())
            stages = []
            for s in range(4):
                with torch.device("meta"):
                    stages.append(make_pipeline_stage(build(), s, 4))
        names = sorted(n for st in stages for n, _ in st.named_parameters())
        assert names == whole
        if stages[0].kind == "discriminator":
            assert [sorted(st.heads) for st in stages] == [[], ["0"], ["1"], ["2"]]
            assert stages[3].proj is not None and stages[0].proj is None
        assert any(n.startswith("backbone.patch_embed") for n, _ in stages[0].named_parameters())
        assert not any(n.startswith("backbone.patch_embed") for n, _ in stages[1].named_parameters())


def test_pipeline_stage_state_dict_round_trip():
    """A bare MMDiT's stage names its tensors as the MMDiT does (no wrapper prefix) and loads them back."""
    import torch

    from megatron_apt.models import build_mmdit
    from megatron_apt.parallel.pipeline import make_pipeline_stage

    full = build_mmdit("debug", zero_init=False, seed=0).state_dict()
    st = make_pipeline_stage(build_mmdit("debug", zero_init=False, seed=1), 1, 2)
    sd = st.state_dict()
    assert sd and all(not k.startswith("backbone.") for k in sd)
    assert {k.split(".")[1] for k in sd if k.startswith("blocks.")} == {"2", "3"}
    st.load_state_dict({k: full[k] for k in sd})
    assert all(torch.equal(v, full[k]) for k, v in st.state_dict().items())
