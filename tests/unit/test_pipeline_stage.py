"""Pipeline stages on one process: the layer split, the cut of G and D, names, state dicts, and reading a
stage (only) from a model directory."""

import pytest
import torch


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
            assert stages[3].model.proj is not None and stages[0].model.proj is None
        assert any(n.startswith("backbone.patch_embed") for n, _ in stages[0].named_parameters())
        assert not any(n.startswith("backbone.patch_embed") for n, _ in stages[1].named_parameters())


def test_pipeline_stage_state_dict_round_trip():
    """A bare MMDiT's stage names its tensors as the MMDiT does (no wrapper prefix) and loads them back."""
    from megatron_apt.models import build_mmdit
    from megatron_apt.parallel.pipeline import make_pipeline_stage

    full = build_mmdit("debug", zero_init=False, seed=0).state_dict()
    st = make_pipeline_stage(build_mmdit("debug", zero_init=False, seed=1), 1, 2)
    sd = st.state_dict()
    assert sd and all(not k.startswith("backbone.") for k in sd)
    assert {k.split(".")[1] for k in sd if k.startswith("blocks.")} == {"2", "3"}
    st.load_state_dict({k: full[k] for k in sd})
    assert all(torch.equal(v, full[k]) for k, v in st.state_dict().items())


def test_a_stage_is_read_alone_from_a_model_directory(tmp_path):
    """load_pipeline_stage builds on the meta device and reads only the stage's tensors: they equal the whole
    model's, D's fresh heads equal those init_heads draws for the whole D, and nothing else is held."""
    from megatron_apt.config.model import DiscriminatorConfig
    from megatron_apt.models import build_mmdit
    from megatron_apt.checkpoint.model_dir import save_mmdit
    from megatron_apt.models.discriminator import Discriminator
    from megatron_apt.checkpoint.model_dir import load_pipeline_stage

    full = build_mmdit("debug", zero_init=False, seed=4)
    save_mmdit(full, tmp_path / "m")
    ref = full.state_dict()
    D = Discriminator(build_mmdit("debug", zero_init=False, seed=4), DiscriminatorConfig())
    D.init_heads(generator=torch.Generator().manual_seed(9))
    dref = D.state_dict()
    for kind in ("velocity", "generator", "discriminator"):
        seen = set()
        for s in range(2):
            st = load_pipeline_stage(kind, tmp_path / "m", s, 2, discriminator_config=DiscriminatorConfig(),
                                     head_seed=9)
            sd = st.state_dict()
            assert not any(v.is_meta for v in sd.values())
            for k, v in sd.items():
                want = dref[k] if kind == "discriminator" else ref[k.removeprefix("backbone.")]
                assert torch.equal(v, want), (kind, s, k)
            seen |= set(sd)
        whole = set(dref) if kind == "discriminator" else {("backbone." if kind == "generator" else "") + k for k in ref}
        assert seen == whole, kind
    with pytest.raises(ValueError, match="cannot read|lacks"):
        (tmp_path / "m" / "model.safetensors").write_bytes(b"junk")
        load_pipeline_stage("velocity", tmp_path / "m", 0, 2)
