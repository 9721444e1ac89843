"""The offline checkpoint tools against real trainer checkpoints (2 gloo ranks): consolidation of ZeRO-3 x
TP=2, ZeRO-3 x DP=2 (padded partitions) and plain-torch checkpoints equals the trainer's own export and the
runtime model's forward; the APT initialisation starts the APT stage; reshard round trips bit for bit and
its shards feed a tensor-parallel model; bad checkpoints are reported and never modified."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.ranks import run_tool, save_debug_models, tree_hash
import torch
from safetensors.torch import load_file

from tests.helpers.ranks import run_distributed

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
COMMON = ["data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "data.synthetic_size=32", "precision=fp32",
          "parallel.zero_persistence_threshold=0", "steps=1", "global_batch=4", "micro_batch=2", "log_every=1"]


def _runs(base):
    apt = ["stage=apt_image", f"model.init={base}/init/generator", f"model.teacher={base}/diff"]
    return {
        # G and D (+ G's EMA) under ZeRO-3 on 2 tensor-parallel ranks, G started from make-apt-init's generator
        "tp2": COMMON + apt + ["parallel.engine=deepspeed", "parallel.tp=2"],
        # ZeRO-3 over 2 data-parallel ranks (odd-sized tensors such as D's proj.bias are padded); D's lr so
        # small that no weight moves: its heads stay those the APT stage drew at start
        "dp2": COMMON + apt + ["parallel.engine=deepspeed", "optim.d_lr=1e-30"],
        # the plain torch engine (one tensor per parameter), flow matching with EMA
        "torch": COMMON + ["stage=flow", f"model.init={base}/diff", "parallel.engine=torch"],
        # SD3's fixed sin-cos position table: a buffer, which ZeRO-3 checkpoints do not hold
        "sincos": COMMON + ["stage=flow", "parallel.engine=deepspeed", f"model.init={base}/sincos_init"],
    }


def _fresh(engine):
    """Drop ZeRO-3's gathered copies: a no-grad forward leaves them gathered (its trace expects a backward),
    and a later forward would reuse them even after ema_weights() swapped the partitions underneath."""
    if hasattr(engine, "engine"):
        engine.engine.empty_partition_cache()
    return engine


def _probe(trainer):
    """The runtime model's outputs on the tools' probe inputs (all ranks take part: ZeRO-3 gathers)."""
    from megatron_apt.checkpoint.verify import probe_inputs

    engines = trainer.method.engines()
    out = {}
    with torch.no_grad():
        if "G" in engines:
            G, D = engines["G"], engines["D"]
            i = probe_inputs(G.module.config)
            out["generator"] = _fresh(G).raw(i["x"], i["text"])
            with G.ema_weights():
                out["generator_ema"] = _fresh(G).raw(i["x"], i["text"])
            out["discriminator"] = _fresh(D).raw(i["x"], i["t"], i["text"])
        else:
            m = engines["model"]
            i = probe_inputs(m.module.config)
            out["model"] = _fresh(m).raw(i["x"], i["t"], i["text"])
            with m.ema_weights():
                out["model_ema"] = _fresh(m).raw(i["x"], i["t"], i["text"])
    return {k: v.float().tolist() for k, v in out.items()}


def _train_all(rank, world, base):
    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.trainer import Trainer

    probes = {}
    for name, overrides in _runs(base).items():
        trainer = Trainer(load_config(None, overrides + [f"run_dir={base}/{name}"]))
        trainer.train()
        probes[name] = _probe(trainer)
    return probes


def _tp_parity(rank, world, gen_tp2, disc_tp2, gen_tp1, disc_tp1):
    """A randomly initialised model, parallelized at TP=2, loaded with load_tp_shard, against the TP=1 model."""
    from megatron_apt.checkpoint.model_dir import load_discriminator, load_tp_shard
    from megatron_apt.checkpoint.tensor_parallel import tp_partition_dim
    from megatron_apt.checkpoint.verify import probe_forward
    from megatron_apt.config.model import DiscriminatorConfig
    from megatron_apt.models import Discriminator, build_mmdit
    from megatron_apt.checkpoint.model_dir import load_mmdit
    from megatron_apt.parallel import ParallelDims, initialize_model_parallel, parallelize_mmdit
    from megatron_apt.parallel.state import tp_group

    import torch.distributed as dist

    dims = ParallelDims.from_world(world, tp=2)
    initialize_model_parallel(dims)
    tp_rank = dist.get_rank(tp_group())
    ref_g = load_mmdit(gen_tp1, expect_kind="generator")
    ref_d = load_discriminator(disc_tp1)
    g = parallelize_mmdit(build_mmdit(ref_g.config, seed=99, zero_init=False), dims)
    d = Discriminator(build_mmdit(ref_d.backbone.config, seed=98, zero_init=False),
                      DiscriminatorConfig(head_layers=ref_d.head_layers))
    d = parallelize_mmdit(d, dims)
    for model in (g, d):  # the table the tools split by is the runtime's
        for name, p in model.named_parameters():
            want = p.partition_dim if getattr(p, "tensor_model_parallel", False) else -1
            assert tp_partition_dim(name) == want, (name, want)
    g.load_state_dict(load_tp_shard(gen_tp2, tp_rank), strict=True)
    d.load_state_dict(load_tp_shard(disc_tp2, tp_rank), strict=True)
    errs = {}
    for label, model, ref, kind in (("generator", g, ref_g, "generator"), ("discriminator", d, ref_d, "discriminator")):
        a, b = probe_forward(model, kind), probe_forward(ref, kind)
        errs[label] = (a - b).abs().max().item()
        errs[label + "_scale"] = b.abs().mean().item()
    return errs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_apt.checkpoint.apt_init import make_apt_init
    from megatron_apt.models import build_mmdit
    from megatron_apt.checkpoint.model_dir import save_mmdit

    base = tmp_path_factory.mktemp("ckpt_tools")
    save_debug_models(base)
    save_mmdit(build_mmdit("debug", zero_init=False, seed=4, pos_embed="sincos2d", pos_embed_max_size=8,
                           pos_embed_base_size=4), base / "sincos_init")
    make_apt_init(base / "diff", base / "cd", base / "init")  # the trainer's default seed: its heads
    probes = run_distributed(_train_all, 2, str(base), timeout=900)[0]
    return base, probes


def _cli(*args):
    return run_tool("convert_checkpoint", *args)


def _assert_same_tensors(a_dir, b_dir):
    a, b = load_file(str(Path(a_dir) / "model.safetensors")), load_file(str(Path(b_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_consolidate_equals_trainer_export_and_runtime_forward(runs, tmp_path, capsys, monkeypatch):
    import re

    from megatron_apt.checkpoint.model_dir import load_discriminator
    from megatron_apt.checkpoint.verify import probe_forward
    from megatron_apt.checkpoint.model_dir import load_mmdit

    base, probes = runs
    monkeypatch.setenv("MEGATRON_APT_PROGRESS", "1")  # the bar, though stderr is no terminal here
    products = {"tp2": ("generator", "generator_ema", "discriminator"), "dp2": ("generator", "generator_ema",
                "discriminator"), "torch": ("model", "model_ema"), "sincos": ("model", "model_ema")}
    for run, names in products.items():
        before = tree_hash(base / run / "checkpoints")
        out = tmp_path / run
        extra = ["--buffers-from", base / "sincos_init"] if run == "sincos" else ["--expect-preset", "debug"]
        assert _cli("consolidate", "--input", base / run, "--output", out, "--verify", *extra) == 0
        cap = capsys.readouterr()
        log = cap.out
        assert "bit-identical" in log and "parameters" in log, log
        done, total = map(int, re.findall(r"consolidate: 100%.*?\| (\d+)/(\d+) ", cap.err)[-1])
        assert done == total > 0, cap.err[-500:]  # the bar counted every rank-file tensor it planned
        assert ("pos_table from" in log) == (run == "sincos"), log
        assert tree_hash(base / run / "checkpoints") == before  # the input is never modified
        for name in names:
            _assert_same_tensors(out / name, base / run / "export" / name)  # the trainer's own export
            meta = json.loads((out / name / "config.json").read_text())
            if name == "discriminator":
                assert meta["kind"] == "discriminator" and meta["head_layers"] == [2, 3, 4]
                model, kind = load_discriminator(out / name), "discriminator"
            else:
                kind = {"model": "diffusion", "model_ema": "diffusion"}.get(name, "generator")
                model = load_mmdit(out / name, expect_kind=kind)
            got = probe_forward(model, kind)
            want = torch.tensor(probes[run][name])
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{run}/{name}: {m}")
            assert want.abs().mean() > 1e-3
    assert "pos_table" in load_file(str(tmp_path / "sincos" / "model" / "model.safetensors"))
    # one model, its EMA, through a step directory
    step = sorted((base / "tp2" / "checkpoints").glob("step-*"))[-1]
    assert _cli("consolidate", "--input", step, "--model", "G", "--ema", "--output", tmp_path / "g_ema") == 0
    _assert_same_tensors(tmp_path / "g_ema", base / "tp2" / "export" / "generator_ema")


def test_buffers_come_from_the_checkpoint_the_init_model_or_the_config(runs, tmp_path, capsys):
    """The trainer stores buffers (SD3's sin-cos table) as "{engine}.buffer.{name}" in the rank files;
    --buffers-from names a model dir whose buffers win; without either the table is recomputed."""
    from safetensors.torch import save_file

    base, _ = runs
    step = sorted((base / "sincos" / "checkpoints").glob("step-*"))[-1]
    table = load_file(str(base / "sincos_init" / "model.safetensors"))["pos_table"]
    assert _cli("consolidate", "--input", step, "--model", "model", "--output", tmp_path / "a") == 0
    assert "recomputed" not in capsys.readouterr().out  # the checkpoint holds the table
    assert torch.equal(load_file(str(tmp_path / "a" / "model.safetensors"))["pos_table"], table)
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    init = load_file(str(base / "sincos_init" / "model.safetensors"))
    save_file({**init, "pos_table": table + 1.0}, str(shifted / "model.safetensors"))
    shutil.copy(base / "sincos_init" / "config.json", shifted / "config.json")
    assert _cli("consolidate", "--input", step, "--model", "model", "--output", tmp_path / "b",
                "--buffers-from", shifted) == 0
    assert torch.equal(load_file(str(tmp_path / "b" / "model.safetensors"))["pos_table"], table + 1.0)
    ck = tmp_path / "ck"
    shutil.copytree(step, ck)
    for f in ck.glob("rank*.safetensors"):
        save_file({**load_file(str(f)), "model.buffer.pos_table": table + 2.0}, str(f))
        _rerecord_checksum(ck, f.name)  # a deliberate edit, not damage
    assert _cli("consolidate", "--input", ck, "--model", "model", "--output", tmp_path / "c") == 0
    assert "recomputed" not in capsys.readouterr().out
    assert torch.equal(load_file(str(tmp_path / "c" / "model.safetensors"))["pos_table"], table + 2.0)
    for f in ck.glob("rank*.safetensors"):  # an older checkpoint without buffers: recomputed from the config
        save_file({k: v for k, v in load_file(str(f)).items() if ".buffer." not in k}, str(f))
        _rerecord_checksum(ck, f.name)
    assert _cli("consolidate", "--input", ck, "--model", "model", "--output", tmp_path / "d") == 0
    assert "pos_table recomputed from the model config" in capsys.readouterr().out
    assert torch.equal(load_file(str(tmp_path / "d" / "model.safetensors"))["pos_table"], table)


def test_export_generator_from_runs(runs, tmp_path):
    from megatron_apt.checkpoint.model_dir import load_mmdit

    base, _ = runs
    assert _cli("export-generator", "--input", base / "tp2", "--output", tmp_path / "ema", "--verify") == 0
    _assert_same_tensors(tmp_path / "ema", base / "tp2" / "export" / "generator_ema")  # EMA by default
    assert _cli("export-generator", "--input", base / "dp2", "--output", tmp_path / "raw", "--raw") == 0
    _assert_same_tensors(tmp_path / "raw", base / "dp2" / "export" / "generator")
    assert _cli("export-generator", "--input", base / "tp2", "--output", tmp_path / "bf16", "--dtype", "bfloat16") == 0
    model = load_mmdit(tmp_path / "bf16", expect_kind=("generator",), dtype=torch.bfloat16)
    ref = load_file(str(base / "tp2" / "export" / "generator_ema" / "model.safetensors"))
    assert all(torch.equal(p, ref[k].bfloat16()) for k, p in model.state_dict().items())
    assert json.loads((tmp_path / "ema" / "config.json").read_text())["source"]["ema"] is True


def test_make_apt_init_starts_the_apt_stage(runs, tmp_path):
    """init/generator served as model.init of the APT runs; D's backbone is the diffusion weights bit for bit
    and its heads are the ones the APT stage draws (dp2 trained D with lr 1e-30: nothing moved)."""
    from megatron_apt.checkpoint.model_dir import load_discriminator
    from megatron_apt.checkpoint.model_dir import load_mmdit

    base, _ = runs
    g = load_mmdit(base / "init" / "generator", expect_kind=("generator",))
    cd = load_file(str(base / "cd" / "model.safetensors"))
    assert all(torch.equal(v, cd[k]) for k, v in g.state_dict().items())
    d = load_discriminator(base / "init" / "discriminator")
    diff = load_file(str(base / "diff" / "model.safetensors"))
    assert all(torch.equal(v, diff[k]) for k, v in d.backbone.state_dict().items())
    assert d.head_layers == (2, 3, 4)
    assert _cli("consolidate", "--input", base / "dp2", "--model", "D", "--output", tmp_path / "d") == 0
    trained = load_discriminator(tmp_path / "d").state_dict()
    for k, v in d.state_dict().items():
        torch.testing.assert_close(trained[k], v, atol=1e-25, rtol=0, msg=lambda m: f"{k}: {m}")


def test_reshard_round_trip_and_tp_shards_feed_a_parallel_model(runs, tmp_path):
    from megatron_apt.checkpoint.model_dir import load_tp_shard

    base, _ = runs
    step = sorted((base / "tp2" / "checkpoints").glob("step-*"))[-1]
    src = tmp_path / "cons"
    assert _cli("consolidate", "--input", step, "--output", src) == 0
    for name in ("generator", "discriminator"):
        tp2, tp1, tp2b = (tmp_path / f"{name}_{s}" for s in ("tp2", "tp1", "tp2b"))
        assert _cli("reshard", "--input", src / name, "--output", tp2, "--tp", "2", "--verify") == 0
        assert _cli("reshard", "--input", tp2, "--output", tp1, "--tp", "1") == 0
        assert _cli("reshard", "--input", tp1, "--output", tp2b, "--tp", "2") == 0
        _assert_same_tensors(tp1, src / name)
        meta = json.loads((tp2 / "config.json").read_text())
        row = ("backbone." if name == "discriminator" else "") + "blocks.0.attn.x_out.weight"
        assert meta["tp"] == 2 and meta["partition_dims"][row] == 1
        for r in range(2):
            f = f"model-tp{r}-of-2.safetensors"
            a, b = load_file(str(tp2 / f)), load_file(str(tp2b / f))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # tp_rank 1 of the training run (ZeRO over 1 rank: its flat master is the whole local shard) held
        # exactly what load_tp_shard gives for tp_rank 1
        local = load_tp_shard(tp2, 1)
        layout = json.loads((step / "rank00001.json").read_text())
        e = "G" if name == "generator" else "D"
        flat, off = load_file(str(step / "rank00001.safetensors"))[f"{e}.master.0"], 0
        assert layout["tp_rank"] == 1 and layout["engines"][e]["zero_world"] == 1
        for pname, shape, pn, _dim in layout["engines"][e]["groups"][0]:
            key = pname[len("backbone."):] if e == "G" else pname
            assert list(local[key].shape) == list(shape), pname
            assert torch.equal(flat[off:off + pn], local[key].reshape(-1)), pname
            off += pn
        assert off == flat.numel()
    errs = run_distributed(_tp_parity, 2, str(tmp_path / "generator_tp2"), str(tmp_path / "discriminator_tp2"),
                           str(src / "generator"), str(src / "discriminator"))[0]
    assert errs["generator"] <= 1e-5 and errs["discriminator"] <= 1e-5, errs
    assert errs["generator_scale"] > 1e-3 and errs["discriminator_scale"] > 1e-3


def _rerecord_checksum(step, name):
    from megatron_apt.checkpoint import integrity

    meta = json.loads((step / "trainer.json").read_text())
    meta["files"][name] = integrity.digest_record(*integrity.file_digest(step / name))
    (step / "trainer.json").write_text(json.dumps(meta))


def _corrupt_copy(step, dst, how):
    shutil.copytree(step, dst)
    if how == "missing":
        (dst / "rank00001.safetensors").unlink()
    elif how == "truncated":
        f = dst / "rank00001.safetensors"
        os.truncate(f, f.stat().st_size // 2)
    elif how == "shape":
        j = dst / "rank00000.json"
        lay = json.loads(j.read_text())
        lay["engines"]["G"]["groups"][0][0][1] = [16, 32]  # patch_embed.weight is [32, 16]
        j.write_text(json.dumps(lay))
        _rerecord_checksum(dst, j.name)  # a consistent but wrong layout (not a damaged file)
    return dst


@pytest.mark.parametrize("case", ["missing", "truncated", "shape", "preset", "exists", "overlap", "no_model",
                                  "no_ema", "not_generator"])
def test_bad_checkpoints_are_reported(runs, tmp_path, capsys, case):
    base, _ = runs
    step = sorted((base / "tp2" / "checkpoints").glob("step-*"))[-1]
    src = _corrupt_copy(step, tmp_path / "in", case) if case in ("missing", "truncated", "shape") else step
    out = tmp_path / "out"
    args = ["consolidate", "--input", src, "--output", out]
    expect = {"missing": "missing the shard of rank 1", "truncated": "truncated", "shape": "mismatched shapes",
              "preset": "is not a 'toy' model", "exists": "already exists", "overlap": "overlaps the input",
              "no_model": "has no model 'X'", "no_ema": "has no EMA", "not_generator": "no one-step generator"}[case]
    if case == "preset":
        args += ["--expect-preset", "toy"]
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "overlap":
        args[-1] = src / "sub"
    elif case == "no_model":
        args += ["--model", "X"]
    elif case == "no_ema":
        args += ["--model", "D", "--ema"]
    elif case == "not_generator":
        src = base / "torch"
        args = ["export-generator", "--input", src, "--output", out]
    before = tree_hash(src)
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert tree_hash(src) == before
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists() and not (src / "sub").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_cli_exit_status_and_message_in_a_subprocess(runs, tmp_path):
    base, _ = runs
    step = sorted((base / "tp2" / "checkpoints").glob("step-*"))[-1]
    src = _corrupt_copy(step, tmp_path / "in", "truncated")
    r = subprocess.run([sys.executable, str(TOOL), "consolidate", "--input", str(src), "--output", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 2, r.stderr
    assert "rank00001.safetensors" in r.stderr and "truncated" in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_crafted_name_in_trainer_json_is_refused_and_nothing_is_written_outside_output(runs, tmp_path, capsys):
    """Names read from a checkpoint are data: a model named ../../x must not become a folder two levels up."""
    base, _ = runs
    step = sorted((base / "torch" / "checkpoints").glob("step-*"))[-1]
    work = tmp_path / "a" / "b"
    src = work / "in"
    shutil.copytree(step, src)
    meta = json.loads((src / "trainer.json").read_text())
    meta["models"] = {"../../x": meta["models"]["model"]}
    (src / "trainer.json").write_text(json.dumps(meta))
    from safetensors.torch import save_file

    for r in range(meta["world_size"]):  # a consistent crafted checkpoint: layouts and tensors use the name too
        j, f = src / f"rank{r:05d}.json", src / f"rank{r:05d}.safetensors"
        lay = json.loads(j.read_text())
        lay["engines"] = {"../../x": lay["engines"]["model"]}
        j.write_text(json.dumps(lay))
        save_file({"../../x." + k[len("model."):]: v for k, v in load_file(str(f)).items()}, str(f))
        _rerecord_checksum(src, j.name)
        _rerecord_checksum(src, f.name)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert _cli("consolidate", "--input", src, "--output", work / "out") == 2
    err = capsys.readouterr().err
    assert "'../../x' is not a plain name" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_consolidate_verifies_checksums_and_falls_back_from_a_damaged_latest(runs, tmp_path, capsys, caplog):
    base, _ = runs
    run = tmp_path / "run"
    shutil.copytree(base / "torch", run)
    step1 = sorted((run / "checkpoints").glob("step-*"))[-1]
    older = run / "checkpoints" / "step-00000000"
    shutil.copytree(step1, older)  # an older complete checkpoint to fall back to
    meta = json.loads((older / "trainer.json").read_text())
    meta["step"] = 0
    (older / "trainer.json").write_text(json.dumps(meta))
    f = step1 / "rank00001.safetensors"
    b = bytearray(f.read_bytes())
    b[-32] ^= 0x01  # one flipped bit
    f.write_bytes(bytes(b))
    assert _cli("consolidate", "--input", step1, "--output", tmp_path / "o1") == 2  # the named step: refused
    err = capsys.readouterr().err
    assert "rank00001.safetensors does not match its recorded checksum" in err, err
    assert not (tmp_path / "o1").exists()
    with caplog.at_level("WARNING"):
        assert _cli("consolidate", "--input", run, "--output", tmp_path / "o2") == 0  # the run: its previous one
    assert any("rank00001.safetensors" in r.getMessage() and "previous" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "o2" / "model" / "config.json").read_text())["source"]["step"] == 0
