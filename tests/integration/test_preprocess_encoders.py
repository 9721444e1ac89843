"""Preprocessing with tiny random VAEs and text encoders loaded from disk: what is stored equals encoding the
clips and captions directly through the public loaders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_apt.data import indexed
from megatron_apt.data.dataset import LatentVideoDataset, collate_video_text
from megatron_apt.data.preprocess import build_parser, main, process
from tests.helpers.fixtures import make_tiny_kl_vae, make_tiny_text_encoder, make_tiny_wan_vae
from megatron_apt.data.toy import make_toy_dataset
from megatron_apt.models.text_encoder import load_text_encoder, load_tokenizer
from megatron_apt.models.vae import load_vae

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    make_toy_dataset(root / "toy", num=4, seed=2)
    make_toy_dataset(root / "toy_images", num=2, seed=3, images=True)
    return {
        "root": root,
        "toy": root / "toy",
        "images": root / "toy_images",
        "wan": make_tiny_wan_vae(root / "wan"),
        "kl": make_tiny_kl_vae(root / "kl"),
        "umt5": make_tiny_text_encoder(root / "umt5"),
    }


def run(*argv):
    return process(build_parser().parse_args([str(a) for a in argv]))


def _pixels(env, out, frames):
    run("--input", env["toy"], "--output", out, "--resolution", "32x32", "--fps", "8", "--frames", frames,
        "--workers", "0", "--no-progress")
    return LatentVideoDataset(out, raw_pixels=True)


def test_wan_latents_and_umt5_hidden_states(env):
    out = env["root"] / "wan_ds"
    # 2 s at 8 fps = 16 frames, rounded down to 13 = 1 + 4k for the Wan VAE
    run("--input", env["toy"], "--output", out, "--resolution", "32x32", "--fps", "8", "--seconds", "2",
        "--vae", env["wan"], "--text-encoder", env["umt5"], "--max-text-len", "12", "--workers", "0", "--no-progress",
        "--batch-size", "2", "--verify")
    m = indexed.read_manifest(out)
    assert m["frames"] == 13 and m["media"] == "latents" and m["fields"]["latents"]["storage"] == "uint16"
    assert m["settings"]["vae"]["class"] == "AutoencoderKLWan"
    assert m["settings"]["text_encoder"]["class"] == "UMT5EncoderModel"
    ds = LatentVideoDataset(out)
    assert ds.text_kind == "hidden" and ds.bucket_keys() == [(4, 4, 4)] * 4

    pix = _pixels(env, env["root"] / "pix13", 13)
    vae = load_vae(env["wan"])
    enc = load_text_encoder(env["umt5"])
    for i in range(len(ds)):
        s = ds[i]
        assert s["latents"].dtype == torch.bfloat16 and s["latents"].shape == (4, 4, 4, 4)
        video = pix[i]["pixels"][None].float() / 127.5 - 1  # [1, 3, T, H, W]
        want = vae.encode(video)[0].to(torch.bfloat16)
        torch.testing.assert_close(s["latents"].float(), want.float(), rtol=2e-2, atol=2e-2)
        hidden, mask = enc.encode([s["caption"]], max_length=12)
        n = int(mask.sum())
        assert s["text_len"] == n <= 12 and s["text"].shape == (n, 32)
        torch.testing.assert_close(s["text"].float(), hidden[0, :n].to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)
        if n == 12:
            assert s["meta"].get("text_truncated") is True
    batch = collate_video_text([ds[i] for i in range(4)])
    assert batch["latents"].shape == (4, 4, 4, 4, 4) and batch["text"].shape[2] == 32


def test_wan_rejects_frame_counts_it_cannot_encode(env, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--input", str(env["toy"]), "--output", str(tmp_path / "o"), "--resolution", "32x32", "--frames", "16",
              "--vae", env["wan"]])
    assert "--frames 16 does not suit AutoencoderKLWan (needs 1 + 4k frames, e.g. 13 or 17)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--input", str(env["toy"]), "--output", str(tmp_path / "o"), "--resolution", "36x36", "--frames", "13",
              "--vae", env["wan"]])
    assert "not a multiple of the VAE's spatial compression 8" in capsys.readouterr().err


def test_image_vae_on_videos_and_images_with_tokenizer_ids(env, tmp_path):
    out = tmp_path / "kl"
    for inp, name in ((env["toy"], "v"), (env["images"], "i")):
        run("--input", inp, "--output", f"{out}_{name}", "--resolution", "32x32", "--fps", "8", "--frames", "6",
            "--vae", env["kl"], "--latent-dtype", "float32", "--tokenizer", env["umt5"], "--workers", "0",
            "--no-progress")
    indexed.merge_datasets([f"{out}_v", f"{out}_i"], out)  # images and videos in one data set
    ds = LatentVideoDataset(out)
    assert ds.bucket_keys() == [(6, 8, 8)] * 4 + [(1, 8, 8)] * 2  # image VAE: no temporal compression; images T=1
    tok = load_tokenizer(env["umt5"])
    vae = load_vae(env["kl"])
    for i in range(len(ds)):
        s = ds[i]
        assert s["latents"].dtype == torch.float32 and s["text"].dtype == torch.int64
        assert s["text"].tolist() == tok.encode(s["caption"], 512)
    # the image sample's latent is the VAE encoding of the resized image
    img = np.array(Image.open(env["images"] / "toy_00000.png").convert("RGB"))
    video = torch.from_numpy(img).permute(2, 0, 1)[:, None][None].float() / 127.5 - 1
    torch.testing.assert_close(ds[4]["latents"], vae.encode(video)[0], rtol=1e-4, atol=1e-4)
    assert json.loads(Path(f"{out}.json").read_text())["num_samples"] == 6
