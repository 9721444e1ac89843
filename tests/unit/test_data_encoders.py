"""VAE and text-encoder loaders on tiny random diffusers/transformers models saved to disk and loaded back
through the same functions users call (nothing is downloaded)."""

import json

import pytest
import torch

from tests.helpers.fixtures import make_tiny_kl_vae, make_tiny_text_encoder, make_tiny_wan_vae
from megatron_apt.models.text_encoder import ByteTokenizer, load_text_encoder, load_tokenizer, read_text_encoder_info
from megatron_apt.models.vae import load_vae, read_vae_info


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "wan": make_tiny_wan_vae(root / "wan"),
        "kl": make_tiny_kl_vae(root / "kl"),
        "umt5": make_tiny_text_encoder(root / "umt5", kind="umt5"),
        "t5": make_tiny_text_encoder(root / "t5", kind="t5"),
        "root": root,
    }


def _video(b=2, t=5, h=16, w=24, seed=0):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_wan_vae_encode_normalises_with_config_mean_std(models):
    vae = load_vae(models["wan"])
    assert (vae.class_name, vae.temporal_compression, vae.spatial_compression, vae.latent_channels) == (
        "AutoencoderKLWan", 4, 8, 4)
    x = _video()
    z = vae.encode(x)
    assert z.shape == (2, 4, 2, 2, 3) and z.dtype == torch.float32
    cfg = json.loads((models["root"] / "wan" / "config.json").read_text())
    with torch.no_grad():
        raw = vae.model.encode(x).latent_dist.mode()
    mean = torch.tensor(cfg["latents_mean"]).view(1, 4, 1, 1, 1)
    std = torch.tensor(cfg["latents_std"]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std, rtol=1e-5, atol=1e-5)
    assert vae.latent_shape(5, 16, 24) == (4, 2, 2, 3)
    video = vae.decode(z)
    assert video.shape == x.shape and video.abs().max() <= 1.0
    torch.testing.assert_close(vae.decode(z, tile=True), video)  # diffusers tiling switched on for the call
    assert not vae.model.use_tiling
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(_video(t=4))
    with pytest.raises(ValueError, match="multiples"):
        vae.encode(_video(h=12))


def test_speed_up_decoder_changes_layout_not_results(models):
    """channels_last puts every convolution weight in the channels-last layout (3-D and 2-D convs alike) and
    decodes the same video; compile is in place (the module and its state-dict keys stay) and the compiled
    decoder (dynamo with its eager backend: the tracing and guards, without code generation) decodes the same
    video, its graphs compiled in the first decode and none in the second."""
    from torch._dynamo.utils import counters

    from megatron_apt.models.vae import speed_up_decoder

    vae = load_vae(models["wan"])
    z = vae.encode(_video())
    plain = vae.decode(z)
    keys = list(vae.model.state_dict())
    speed_up_decoder(vae.model, channels_last=True)
    convs = [m for m in vae.model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d))]
    assert any(isinstance(m, torch.nn.Conv2d) for m in convs) and any(isinstance(m, torch.nn.Conv3d) for m in convs)
    for m in convs:
        fmt = torch.channels_last_3d if m.weight.ndim == 5 else torch.channels_last
        assert m.weight.is_contiguous(memory_format=fmt)
        # a 1x1 kernel is both layouts at once; every larger one is no longer in the default layout
        assert m.weight[0, 0].numel() == 1 or not m.weight.is_contiguous()
    torch.testing.assert_close(vae.decode(z), plain, rtol=1e-5, atol=1e-5)
    decoder = vae.model.decoder
    speed_up_decoder(vae.model, compile=True, backend="eager")
    assert vae.model.decoder is decoder and list(vae.model.state_dict()) == keys
    graphs = counters["stats"]["unique_graphs"]
    torch.testing.assert_close(vae.decode(z), plain, rtol=1e-5, atol=1e-5)
    first = counters["stats"]["unique_graphs"]
    assert first > graphs  # the decoder ran compiled
    torch.testing.assert_close(vae.decode(z), plain, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == first  # static shapes: nothing compiled again


def test_image_vae_encodes_frames_independently_with_scale_and_shift(models):
    vae = load_vae(models["kl"])
    assert (vae.class_name, vae.temporal_compression, vae.spatial_compression) == ("AutoencoderKL", 1, 4)
    x = _video(t=3)
    z = vae.encode(x, frame_chunk=2)
    assert z.shape == (2, 4, 3, 4, 6)
    with torch.no_grad():
        raw = vae.model.encode(x[:, :, 1]).latent_dist.mode()
    torch.testing.assert_close(z[:, :, 1], (raw - 0.1) * 0.5, rtol=1e-5, atol=1e-5)
    assert vae.decode(z).shape == x.shape


def test_vae_dir_errors(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_vae_info(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    with pytest.raises(ValueError, match="unsupported VAE class 'AutoencoderTiny'"):
        read_vae_info(tmp_path / "other")
    # a diffusers pipeline folder with a vae/ subfolder works
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "vae").symlink_to(models["root"] / "wan", target_is_directory=True)
    assert read_vae_info(pipe).class_name == "AutoencoderKLWan"


@pytest.mark.parametrize("kind,cls", [("umt5", "UMT5EncoderModel"), ("t5", "T5EncoderModel")])
def test_text_encoder_hidden_states_and_mask(models, kind, cls):
    enc = load_text_encoder(models[kind])
    assert enc.name == cls and enc.dim == 32 and read_text_encoder_info(models[kind])["class"] == cls
    texts = ["the digit 3 moving left", "a cat", "waves roll onto a sandy beach under a blue sky"]
    hidden, mask = enc.encode(texts, max_length=64)
    lengths = mask.sum(1).tolist()
    assert hidden.shape == (3, max(lengths), 32) and mask.dtype == torch.bool
    ids = enc.tokenizer.encode(texts[1])
    assert lengths[1] == len(ids) and ids[-1] == 1  # T5 appends </s> (id 1)
    assert (hidden[1, lengths[1]:] == 0).all()  # padding zeroed
    alone, _ = enc.encode([texts[1]], max_length=64)
    torch.testing.assert_close(alone[0], hidden[1, : lengths[1]], rtol=1e-4, atol=1e-5)  # padding does not leak
    short, m = enc.encode(texts, max_length=4)
    assert m.sum(1).max() == 4 and short.shape[1] == 4


def test_tokenizer_loading_and_byte_fallback(models):
    tok = load_tokenizer(models["umt5"])
    ids = tok.encode("the digit 7 moving up")
    assert ids[-1] == 1 and tok.decode(ids) == "the digit 7 moving up" and tok.pad_id == 0
    b = ByteTokenizer()
    assert b.encode("hé") == [ord("h") + 1, 0xC3 + 1, 0xA9 + 1]
    assert b.decode(b.encode("hé ✓")) == "hé ✓" and len(b.encode("x" * 10, max_length=4)) == 4
    ids, mask = b(["ab", "abcd"])
    assert ids.tolist() == [[98, 99, 0, 0], [98, 99, 100, 101]] and mask.sum().item() == 6
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(models["root"] / "nope")
