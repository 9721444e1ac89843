"""Offline conversions on model directories (no process groups): tensor-parallel resharding, the APT
initialisation, the inference generator export, the SD3 round trip of a one-step generator, atomic writes
and clear errors that leave every input untouched."""

import json
import os
from pathlib import Path

import pytest

from tests.helpers.ranks import run_tool, save_debug_models, tree_hash
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    return run_tool("convert_checkpoint", *args)


def _tensors(d, name="model.safetensors"):
    return load_file(str(Path(d) / name))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from megatron_apt.models import build_mmdit
    from megatron_apt.checkpoint.model_dir import save_mmdit

    base = tmp_path_factory.mktemp("convert")
    save_debug_models(base)
    save_mmdit(build_mmdit("debug", zero_init=False, seed=3, num_layers=3), base / "cd3", kind="consistency")
    return base


def test_partition_dims_follow_the_tensor_parallel_plan():
    from megatron_apt.checkpoint.tensor_parallel import tp_partition_dim

    cases = {"blocks.0.attn.x_q.weight": 0, "blocks.0.attn.x_q.bias": 0, "blocks.3.attn.c_v.weight": 0,
             "blocks.1.x_mlp.fc1.bias": 0, "blocks.1.attn.x_out.weight": 1, "blocks.1.attn.x_out.bias": -1,
             "blocks.2.c_mlp.fc2.weight": 1, "blocks.2.c_mlp.fc2.bias": -1, "blocks.0.attn.x_norm_q.weight": -1,
             "blocks.0.x_mod.weight": -1, "patch_embed.weight": -1, "x_mod.weight": -1,
             "backbone.blocks.0.attn.c_k.weight": 0, "backbone.blocks.0.c_mlp.fc2.weight": 1,
             "heads.0.to_q.weight": -1, "heads.0.mlp.fc1.weight": -1, "proj.weight": -1, "pos_table": -1}
    assert {k: tp_partition_dim(k) for k in cases} == cases


def test_reshard_round_trip_is_bit_exact_and_shards_are_the_runtime_split(dirs, tmp_path):
    from megatron_apt.checkpoint.apt_init import make_apt_init
    from megatron_apt.checkpoint.model_dir import load_tp_shard

    make_apt_init(dirs / "diff", dirs / "cd", tmp_path / "init")
    for name in ("generator", "discriminator"):
        src = tmp_path / "init" / name
        full = _tensors(src)
        before = tree_hash(src)
        assert _cli("reshard", "--input", src, "--output", tmp_path / f"{name}2", "--tp", "2", "--verify") == 0
        assert _cli("reshard", "--input", tmp_path / f"{name}2", "--output", tmp_path / f"{name}4", "--tp", "4") == 0
        assert _cli("reshard", "--input", tmp_path / f"{name}4", "--output", tmp_path / f"{name}1", "--tp", "1",
                    "--verify") == 0
        assert tree_hash(src) == before
        back = _tensors(tmp_path / f"{name}1")
        assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
        meta = json.loads((tmp_path / f"{name}1" / "config.json").read_text())
        assert "tp" not in meta and meta["kind"] == name
        meta2 = json.loads((tmp_path / f"{name}2" / "config.json").read_text())
        assert meta2["tp"] == 2 and meta2["kind"] == name and len(meta2["partition_dims"]) == len(full)
        for r in range(4):
            local = load_tp_shard(tmp_path / f"{name}4", r)
            from_full = load_tp_shard(src, r, tp=4)  # a consolidated dir split on the fly
            from_two = load_tp_shard(tmp_path / f"{name}2", r, tp=4)  # a tp=2 dir resplit
            for k, v in full.items():
                d = meta2["partition_dims"][k]
                want = v.chunk(4, dim=d)[r] if d >= 0 else v
                assert all(torch.equal(s[k], want) for s in (local, from_full, from_two)), k
        assert set(load_tp_shard(tmp_path / f"{name}2", 0, prefix="backbone.")) == {f"backbone.{k}" for k in full}


def test_make_apt_init(dirs, tmp_path, capsys):
    from megatron_apt.checkpoint.model_dir import load_discriminator
    from megatron_apt.config.model import DiscriminatorConfig
    from megatron_apt.models import Discriminator, build_mmdit
    from megatron_apt.checkpoint.model_dir import load_mmdit

    hashes = {d: tree_hash(dirs / d) for d in ("diff", "cd")}
    out = tmp_path / "init"
    assert _cli("make-apt-init", "--diffusion", dirs / "diff", "--consistency", dirs / "cd", "--output", out,
                "--head-layers", "2,4", "--seed", "7", "--verify", "--expect-preset", "debug") == 0
    log = capsys.readouterr().out
    assert "discriminator backbone bit-identical" in log and "fresh head tensors" in log
    assert {d: tree_hash(dirs / d) for d in hashes} == hashes
    g = load_mmdit(out / "generator", expect_kind=("generator",))  # what the APT stage's model.init reads
    cd = _tensors(dirs / "cd")
    assert all(torch.equal(v, cd[k]) for k, v in g.state_dict().items())
    d = load_discriminator(out / "discriminator")
    diff = _tensors(dirs / "diff")
    assert all(torch.equal(v, diff[k]) for k, v in d.backbone.state_dict().items())
    assert d.head_layers == (2, 4)
    meta = json.loads((out / "discriminator" / "config.json").read_text())
    assert meta["kind"] == "discriminator" and meta["head_layers"] == [2, 4]
    # the heads are drawn as the APT stage draws them for a run with seed 7 (methods/adversarial.py)
    ref = Discriminator(build_mmdit("debug", seed=0), DiscriminatorConfig(head_layers=(2, 4)))
    ref.init_heads(generator=torch.Generator().manual_seed(7 + 17))
    got = d.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("backbone."):
            assert torch.equal(got[k], v), k
    with torch.no_grad():
        x, t, text = torch.randn(2, 4, 1, 8, 8), torch.rand(2), torch.randn(2, 5, 24)
        assert torch.isfinite(d(x, t, text)).all()


def test_make_apt_init_bad_inputs(dirs, tmp_path, capsys):
    hashes = {d: tree_hash(dirs / d) for d in ("diff", "cd", "cd3")}
    out = tmp_path / "init"
    cases = [
        (["--diffusion", dirs / "cd", "--consistency", dirs / "diff"], "kind mismatch"),
        (["--diffusion", dirs / "diff", "--consistency", dirs / "cd3"], "mismatched shapes"),
        (["--diffusion", dirs / "diff", "--consistency", dirs / "cd", "--expect-preset", "toy"],
         "is not a 'toy' model"),
        (["--diffusion", dirs / "diff", "--consistency", dirs / "cd", "--head-layers", "9"], "outside the backbone"),
        (["--diffusion", dirs / "missing", "--consistency", dirs / "cd"], "does not exist"),
    ]
    for args, msg in cases:
        assert _cli("make-apt-init", *args, "--output", out) == 2, args
        err = capsys.readouterr().err
        assert msg in err, (args, err)
        assert not out.exists()
    assert {d: tree_hash(dirs / d) for d in hashes} == hashes
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_export_generator_from_model_dirs(dirs, tmp_path, capsys):
    from megatron_apt.checkpoint.model_dir import load_mmdit

    assert _cli("export-generator", "--input", dirs / "cd", "--output", tmp_path / "g", "--verify") == 0
    assert "reload bit-identical" in capsys.readouterr().out
    g = load_mmdit(tmp_path / "g", expect_kind=("generator",))
    cd = _tensors(dirs / "cd")
    assert all(torch.equal(v, cd[k]) for k, v in g.state_dict().items())
    assert _cli("export-generator", "--input", tmp_path / "g", "--output", tmp_path / "h", "--dtype", "bfloat16") == 0
    assert {v.dtype for v in _tensors(tmp_path / "h").values()} == {torch.bfloat16}
    # a diffusion model is not a one-step generator; an existing output needs --overwrite
    assert _cli("export-generator", "--input", dirs / "diff", "--output", tmp_path / "x") == 2
    assert "kind mismatch" in capsys.readouterr().err and not (tmp_path / "x").exists()
    before = tree_hash(tmp_path / "h")
    assert _cli("export-generator", "--input", tmp_path / "g", "--output", tmp_path / "h") == 2
    assert "already exists" in capsys.readouterr().err and tree_hash(tmp_path / "h") == before
    assert _cli("export-generator", "--input", tmp_path / "g", "--output", tmp_path / "h", "--overwrite") == 0
    assert {v.dtype for v in _tensors(tmp_path / "h").values()} == {torch.float32}
    # the output may never be the input
    assert _cli("export-generator", "--input", tmp_path / "g", "--output", tmp_path / "g", "--overwrite") == 2
    assert "overlaps the input" in capsys.readouterr().err


def test_reshard_bad_inputs(dirs, tmp_path, capsys):
    assert _cli("reshard", "--input", dirs / "cd", "--output", tmp_path / "three", "--tp", "3") == 2
    assert "cannot be split 3 ways" in capsys.readouterr().err and not (tmp_path / "three").exists()
    assert _cli("reshard", "--input", dirs / "cd", "--output", tmp_path / "two", "--tp", "2") == 0
    broken = tmp_path / "broken"
    for how, msg in [("missing", "missing model-tp1-of-2.safetensors"), ("truncated", "truncated"),
                     ("shape", "mismatched shapes")]:
        import shutil

        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(tmp_path / "two", broken)
        f = broken / "model-tp1-of-2.safetensors"
        if how == "missing":
            f.unlink()
        elif how == "truncated":
            os.truncate(f, f.stat().st_size - 100)
        else:  # a shard that belongs to another model
            from safetensors.torch import save_file

            st = load_file(str(f))
            st["blocks.0.attn.x_q.weight"] = torch.zeros(8, 32)
            save_file(st, str(f))
        before = tree_hash(broken)
        assert _cli("reshard", "--input", broken, "--output", tmp_path / "out", "--tp", "1") == 2, how
        assert msg in capsys.readouterr().err, how
        assert tree_hash(broken) == before and not (tmp_path / "out").exists()


def test_a_failed_conversion_leaves_nothing(dirs, tmp_path, monkeypatch):
    """A conversion killed half-way (here: an error while writing the second model) leaves no output."""
    from megatron_apt.checkpoint import apt_init

    calls = []
    real = apt_init.write_model_files

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(apt_init, "write_model_files", dying)
    with pytest.raises(KeyboardInterrupt):
        apt_init.make_apt_init(dirs / "diff", dirs / "cd", tmp_path / "init")
    assert list(tmp_path.iterdir()) == []


def test_sd3_one_step_generator_round_trip(tmp_path):
    """An SD3-configured one-step generator: export-generator -> export-diffusers -> import-diffusers is bit-exact,
    diffusers' one-step output z - v(z, T) matches ours within 1e-4 (fp32), and it reshards."""
    from diffusers import SD3Transformer2DModel

    from megatron_apt.checkpoint.diffusers_sd3 import import_diffusers
    from megatron_apt.models import OneStepGenerator
    from megatron_apt.checkpoint.model_dir import load_mmdit
    from megatron_apt.checkpoint.model_dir import save_state_dir
    from tests.unit.test_sd3_import import _tiny_sd3

    _ref, src = _tiny_sd3(tmp_path, "rms_norm")
    model = import_diffusers(src, tmp_path / "imported")
    save_state_dir(model.state_dict(), model.config, tmp_path / "ghat", kind="consistency")
    assert _cli("export-generator", "--input", tmp_path / "ghat", "--output", tmp_path / "gen", "--verify") == 0
    assert _cli("export-diffusers", "--input", tmp_path / "gen", "--output", tmp_path / "dif", "--verify") == 0
    assert _cli("import-diffusers", "--input", tmp_path / "dif", "--output", tmp_path / "back") == 0
    a, b = _tensors(tmp_path / "gen"), _tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gen = OneStepGenerator(load_mmdit(tmp_path / "gen", expect_kind=("generator",))).eval()
    theirs = SD3Transformer2DModel.from_pretrained(tmp_path / "dif", torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 1, 16, 16, generator=g)
    text, pooled = torch.randn(2, 7, 24, generator=g), torch.randn(2, 12, generator=g)
    with torch.no_grad():
        ours = gen(z, text, pooled=pooled)[:, :, 0]
        v = theirs(hidden_states=z[:, :, 0], encoder_hidden_states=text, pooled_projections=pooled,
                   timestep=torch.full((2,), 1000.0), return_dict=False)[0]
    assert (ours - (z[:, :, 0] - v)).abs().max().item() <= 1e-4
    # per-block adaLN, the sin-cos table buffer and the unused last-block text query all reshard
    assert _cli("reshard", "--input", tmp_path / "gen", "--output", tmp_path / "gen2", "--tp", "2", "--verify") == 0
    assert _cli("reshard", "--input", tmp_path / "gen2", "--output", tmp_path / "gen1", "--tp", "1") == 0
    c = _tensors(tmp_path / "gen1")
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_a_model_directory_that_would_not_fit_is_refused_and_the_old_one_stays(tmp_path, monkeypatch):
    from megatron_apt import utils
    from megatron_apt.checkpoint.model_dir import load_mmdit, save_mmdit
    from megatron_apt.models import build_mmdit

    old, new = build_mmdit("debug", zero_init=False, seed=1), build_mmdit("debug", zero_init=False, seed=2)
    save_mmdit(old, tmp_path / "m")
    before = tree_hash(tmp_path / "m")
    monkeypatch.setattr(utils, "free_bytes", lambda path: 1 << 20)
    with pytest.raises(utils.NotEnoughSpaceError, match=r"not enough free space for the model directory m in .*"
                                                        r"nothing was written"):
        save_mmdit(new, tmp_path / "m", overwrite=True)
    assert tree_hash(tmp_path / "m") == before and sorted(os.listdir(tmp_path)) == ["m"]
    monkeypatch.undo()
    save_mmdit(new, tmp_path / "m", overwrite=True)  # with room, the same write replaces it
    got, want = load_mmdit(tmp_path / "m").state_dict(), new.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
