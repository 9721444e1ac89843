"""tools/generate.py end to end on CPU: a debug generator, a tiny random UMT5 encoder with a trained
SentencePiece tokenizer and a tiny random Wan VAE, all loaded through the same code users use."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "generate.py"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.helpers.fixtures import make_tiny_text_encoder, make_tiny_wan_vae
    from megatron_apt.models import build_mmdit
    from megatron_apt.checkpoint.model_dir import save_mmdit

    d = tmp_path_factory.mktemp("gen")
    make_tiny_wan_vae(d / "vae", z_dim=4)
    make_tiny_text_encoder(d / "te", d_model=24)
    save_mmdit(build_mmdit("debug", zero_init=False, seed=3), d / "g", kind="generator")
    save_mmdit(build_mmdit("debug", zero_init=False, seed=4), d / "disc", kind="discriminator")
    return d


def _run(args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=600)


def test_generate_mp4_and_grid_through_real_loaders(assets, tmp_path):
    from megatron_apt.inference.video import read_mp4

    out = tmp_path / "out"
    # 9 frames at 8 fps -> Wan latent (9-1)/4+1 = 3 frames; 32x32 px -> 4x4 latent -> 2x2 patches
    r = _run(["--model", assets / "g", "--text-encoder", assets / "te", "--vae", assets / "vae", "--prompt",
              "a red square", "--prompt", "a blue circle", "--resolution", "32x32", "--frames", "9", "--fps", "8",
              "--seeds", "0,1", "--out", out])
    assert r.returncode == 0, r.stderr[-2000:]
    mp4s = sorted(out.glob("*.mp4"))
    assert len(mp4s) == 4
    frames = read_mp4(mp4s[0])
    assert frames.shape == (9, 32, 32, 3)
    assert (out / "grid.png").is_file()
    t = json.loads((out / "timings.json").read_text())
    assert t["samples"] == 4 and t["dit_s"] > 0 and t["vae_s"] > 0 and t["text_s"] > 0
    # two steps work zero-shot with the same weights
    r = _run(["--model", assets / "g", "--text-encoder", assets / "te", "--vae", assets / "vae", "--prompt", "x",
              "--resolution", "32x32", "--frames", "9", "--steps", "2", "--out", tmp_path / "two"])
    assert r.returncode == 0, r.stderr[-2000:]


def test_generate_bad_inputs(assets, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    r = _run(["--model", assets / "g", "--prompts-file", empty, "--vae", assets / "vae", "--text-encoder",
              assets / "te", "--out", tmp_path / "o"])
    assert r.returncode == 2 and "holds no prompt" in r.stderr
    r = _run(["--model", assets / "g", "--prompt", "x", "--vae", assets / "vae", "--text-encoder", assets / "te",
              "--resolution", "36x32", "--frames", "9", "--out", tmp_path / "o"])
    assert r.returncode == 2 and "not divisible" in r.stderr
    r = _run(["--model", assets / "disc", "--prompt", "x", "--out", tmp_path / "o"])
    assert r.returncode == 2 and "'discriminator' checkpoint" in r.stderr


def test_generator_applies_the_vae_decode_options(assets):
    """The Generator hands its VAE options to the decoder: channels-last convolution weights when asked (what
    tools/generate.py asks on a GPU), the default layout otherwise."""
    import torch

    from megatron_apt.inference.pipeline import Generator

    def conv_weights(gen):  # the 3-D kernels larger than 1x1x1 (those are both layouts at once)
        return [m.weight for m in gen.vae.model.modules()
                if isinstance(m, torch.nn.Conv3d) and m.weight[0, 0].numel() > 1]

    plain = Generator(str(assets / "g"), text=str(assets / "te"), vae=str(assets / "vae"))
    fast = Generator(str(assets / "g"), text=str(assets / "te"), vae=str(assets / "vae"), vae_channels_last=True)
    assert conv_weights(plain) and all(w.is_contiguous() for w in conv_weights(plain))
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
               for w in conv_weights(fast))
