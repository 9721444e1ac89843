"""The MMDiT backbone on one rank: shapes, registry, checkpoint directories, clear errors."""

import pytest
import torch

from megatron_apt.config import MMDiTConfig, get_model_config
from megatron_apt.models import build_mmdit, count_parameters
from megatron_apt.checkpoint.model_dir import load_mmdit, save_mmdit
from megatron_apt.parallel import ParallelDims
from megatron_apt.parallel.parallelize import check_heads


def _inputs(B=2, C=4, T=1, H=8, W=8, L=5, text_dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, T, H, W, generator=g), torch.rand(B, generator=g),
            torch.randn(B, L, text_dim, generator=g))


def test_8b_preset_counts_8b_parameters_on_meta():
    model = build_mmdit("8b", device="meta")
    n = count_parameters(model)
    assert 7.5e9 <= n <= 8.5e9, n
    assert model.config.num_layers == 36 and model.config.hidden_size == 3072 and model.config.head_dim == 128
    assert next(model.parameters()).device.type == "meta"


@pytest.mark.parametrize("T,H,W", [(1, 8, 8), (3, 8, 12), (2, 4, 16)])
def test_forward_shapes_images_and_videos_native_aspect(T, H, W):
    model = build_mmdit("debug", zero_init=False)
    x, t, text = _inputs(T=T, H=H, W=W)
    v = model(x, t, text)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_zero_init_starts_at_zero_velocity_and_padding_mask_matters():
    model = build_mmdit("debug")  # adaLN-Zero: output projection starts at 0
    x, t, text = _inputs()
    assert model(x, t, text).abs().max() == 0
    model = build_mmdit("debug", zero_init=False)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    v_masked = model(x, t, text, mask)
    text2 = text.clone()
    text2[0, 2:] = 100.0  # padded tokens must not matter
    torch.testing.assert_close(model(x, t, text2, mask), v_masked)
    assert not torch.allclose(model(x, t, text), v_masked)


def test_features_stop_at_deepest_layer():
    model = build_mmdit("debug", zero_init=False)
    x, t, text = _inputs()
    feats = model(x, t, text, features_at=[2, 3])
    assert len(feats) == 2 and feats[0].shape == (2, 16, 32)
    calls = []
    model.blocks[3].register_forward_hook(lambda *a: calls.append(1))
    model(x, t, text, features_at=[3])
    assert not calls  # block 4 never ran


def test_rope_makes_positions_matter():
    model = build_mmdit("debug", zero_init=False)
    x, t, text = _inputs(T=2)
    v = model(x, t, text)
    v_flip = model(x.flip(-1), t, text).flip(-1)
    assert not torch.allclose(v, v_flip, atol=1e-5)


def test_bad_inputs_have_clear_errors():
    model = build_mmdit("debug")
    x, t, text = _inputs()
    with pytest.raises(ValueError, match="rank 5"):
        model(x[:, :, 0], t, text)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 3, 1, 8, 8), t, text)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        model(torch.randn(2, 4, 1, 7, 8), t, text)
    with pytest.raises(ValueError, match="text must be"):
        model(x, t, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="text_mask"):
        model(x, t, text, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"t must be"):
        model(x, torch.rand(3), text)
    with pytest.raises(ValueError, match="pooled"):
        model(x, t, text, pooled=torch.randn(2, 4))


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*debug"):
        build_mmdit("huge")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MMDiTConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown MMDiTConfig keys"):
        get_model_config({"hidden": 3})


def test_heads_must_divide_by_tp_times_sp():
    check_heads(24, ParallelDims(tp=2, sp=4))
    with pytest.raises(ValueError, match="not divisible by tp x sp = 4 x 2"):
        check_heads(4 * 3, ParallelDims(tp=4, sp=2))


def test_model_directory_round_trip_and_errors(tmp_path):
    model = build_mmdit("debug", zero_init=False, seed=5)
    save_mmdit(model, tmp_path / "m")
    back = load_mmdit(tmp_path / "m")
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with pytest.raises(FileExistsError):
        save_mmdit(model, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mmdit(tmp_path / "nope")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_mmdit(tmp_path / "m")
    (tmp_path / "w").rename(tmp_path / "m" / "model.safetensors")
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_mmdit(tmp_path / "m")
    with pytest.raises(ValueError, match="expected one of"):
        save_mmdit(model, tmp_path / "g", kind="generator")
        load_mmdit(tmp_path / "g", expect_kind="discriminator")


def test_activation_checkpointing_keeps_values_and_names():
    from megatron_apt.parallel import apply_activation_checkpointing

    model = build_mmdit("debug", zero_init=False)
    x, t, text = _inputs()
    keys = list(model.state_dict())
    v = model(x, t, text)
    v.square().sum().backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model.blocks)
    v2 = model(x, t, text)
    v2.square().sum().backward()
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(v2, v)
    for a, p in zip(g, model.parameters()):
        torch.testing.assert_close(p.grad, a)
