"""Import from diffusers SD3Transformer2DModel reproduces diffusers within 1e-4 (fp32)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _tiny_sd3(tmp_path, qk_norm):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                              num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
                              pooled_projection_dim=12, out_channels=4, pos_embed_max_size=24, qk_norm=qk_norm)
    # diffusers zero-initialises nothing that matters here, but randomise everything so no path is trivially 0
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    d = tmp_path / "sd3"
    m.save_pretrained(d)
    return m, d


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"], ids=["plain", "qk_norm"])
def test_import_matches_diffusers(tmp_path, qk_norm):
    from megatron_apt.checkpoint.diffusers_sd3 import import_diffusers
    from megatron_apt.checkpoint.model_dir import load_mmdit

    ref, src = _tiny_sd3(tmp_path, qk_norm)
    import_diffusers(src, tmp_path / "ours")
    model = load_mmdit(tmp_path / "ours").eval()
    assert model.config.qk_norm == (qk_norm is not None)
    g = torch.Generator().manual_seed(1)
    for h, w in [(16, 16), (12, 20)]:  # square and non-square (centre-cropped position table)
        x = torch.randn(2, 4, 1, h, w, generator=g)
        t = torch.rand(2, generator=g)
        text = torch.randn(2, 7, 24, generator=g)
        pooled = torch.randn(2, 12, generator=g)
        with torch.no_grad():
            ours = model(x, t, text, pooled=pooled)[:, :, 0]
            theirs = ref(hidden_states=x[:, :, 0], encoder_hidden_states=text, pooled_projections=pooled,
                         timestep=t * 1000, return_dict=False)[0]
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert theirs.abs().mean() > 1e-2  # the comparison is not between two near-zero tensors


def test_import_cli_verify_and_export_round_trip(tmp_path):
    from safetensors.torch import load_file

    _ref, src = _tiny_sd3(tmp_path, "rms_norm")
    tool = ROOT / "tools" / "convert_checkpoint.py"
    r = subprocess.run([sys.executable, str(tool), "import-diffusers", "--input", str(src), "--output",
                        str(tmp_path / "ours"), "--verify"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "max |ours - diffusers|" in r.stdout
    r = subprocess.run([sys.executable, str(tool), "export-diffusers", "--input", str(tmp_path / "ours"),
                        "--output", str(tmp_path / "back"), "--verify"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # an existing output is refused without --overwrite, and left untouched
    r = subprocess.run([sys.executable, str(tool), "import-diffusers", "--input", str(src), "--output",
                        str(tmp_path / "ours")], capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_import_reports_missing_files(tmp_path):
    from megatron_apt.checkpoint.diffusers_sd3 import import_diffusers

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_diffusers(tmp_path / "empty", tmp_path / "out")
    _ref, src = _tiny_sd3(tmp_path, None)
    (src / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        import_diffusers(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
