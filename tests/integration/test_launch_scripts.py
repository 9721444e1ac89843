"""The launch scripts examples/pretrain_apt_video.sh, pretrain_apt_image.sh, consistency_distill.sh and
pretrain_diffusion.sh.

* each is valid bash and valid Python (the DeepSpeed launcher runs its target with python), executable,
  and the four share one launch block;
* their flag groups restate their YAML (no drift) and resolve to the paper's numbers (--dry-run);
* the launch paths run end to end on a CPU with 2 gloo ranks: the headline line
  `DEBUG=1 deepspeed --num_gpus 2 examples/pretrain_apt_video.sh` and torchrun through
  `bash examples/pretrain_diffusion.sh`;
* the DeepSpeed configs under examples/ds_configs/ are inputs the trainer merges over what it builds.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"pretrain_apt_video.sh": "apt_video_8b.yaml", "pretrain_apt_image.sh": "apt_image_8b.yaml",
           "consistency_distill.sh": "cd_8b.yaml", "pretrain_diffusion.sh": "diffusion_8b.yaml"}
LAUNCH_MARK = "# ---- launch: these closing lines are the same in every examples/*.sh training script"
PY_MARK = '\n"""\n'


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                       "MASTER_ADDR", "MASTER_PORT", "LAUNCHER", "DEBUG", "DRY_RUN",
                                                       "DATA_PATH", "INIT", "TEACHER", "RUN_DIR", "GPUS_PER_NODE",
                                                       "NNODES", "NODE_RANK", "HOSTFILE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MEGATRON_APT_LOGLEVEL="WARNING",
               PYTHON=sys.executable, DEBUG_MODELS=str(tmp_path / "debug_models"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd, env, timeout=180, cwd=ROOT):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p


def _ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    return p


def _free_port():
    from tests.helpers.ranks import free_port

    return free_port()


# ---- the files themselves ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_is_bash_and_python(name):
    path = ROOT / "examples" / name
    text = path.read_text()
    assert os.access(path, os.X_OK), f"{name} must be executable (deepspeed --no_python runs it directly)"
    assert text.startswith('#!/usr/bin/env bash\n""":"\n')
    _ok(subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True))
    # Python reads the bash part as one string: it must not close early or hold backslash escapes
    bash_part = text.split(PY_MARK)[0]
    assert '"""' not in bash_part[len('#!/usr/bin/env bash\n""":"'):]
    assert "\\" not in bash_part
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(text, str(path), "exec")


def test_one_launch_block():
    """Every script ends with the same stub that sources the one shared launcher, examples/launch.sh."""
    blocks = {n: (ROOT / "examples" / n).read_text().split(LAUNCH_MARK)[1] for n in SCRIPTS}
    first = next(iter(blocks.values()))
    for name, block in blocks.items():
        assert block == first, f"the launch block of {name} differs from that of {next(iter(blocks))}"
    assert 'source "$LAUNCH_SH"' in first
    shared = (ROOT / "examples" / "launch.sh").read_text()
    assert "torch.distributed.run" in shared and "srun" in shared


def _dry_run(tmp_path, name, entry, world_nodes):
    env = _env(tmp_path, DRY_RUN=1, NNODES=world_nodes, GPUS_PER_NODE=8)
    p = _ok(_run([entry, ROOT / "examples" / name], env, timeout=120))
    text = p.stdout
    cfg = yaml.safe_load(text.split("# layout:")[0])
    return cfg, text


@pytest.mark.parametrize("name,entry,nodes", [
    ("pretrain_apt_image.sh", sys.executable, 32),     # `python script`: the polyglot path
    ("pretrain_apt_video.sh", sys.executable, 128),
    ("consistency_distill.sh", "bash", 32),
    ("pretrain_diffusion.sh", "bash", 32),
])
def test_dry_run_matches_yaml_and_paper(tmp_path, name, entry, nodes):
    from megatron_apt.config.model import DiscriminatorConfig
    from megatron_apt.config.train import config_to_dict, load_config

    got, text = _dry_run(tmp_path, name, entry, nodes)
    want = config_to_dict(load_config(ROOT / "examples" / "configs" / SCRIPTS[name], ["data.synthetic=true"]))
    for d in (got, want):  # inputs: placeholders in the dry run, null in the YAML
        d["data"].pop("path")
        d["data"].pop("synthetic")
        d["model"].pop("init")
        d["model"].pop("teacher")
    # the scripts hand DeepSpeed the shipped JSON (a path, so not in the YAML), and the dry run prints the merge
    assert got["parallel"].pop("deepspeed_config") == str(ROOT / "examples" / "ds_configs" / "zero3_bf16.json")
    assert want["parallel"].pop("deepspeed_config") is None
    assert got == want, "the script's flag groups and its YAML disagree"
    ds = json.loads(text.split("JSON to the end of the output:\n", 1)[1])
    shipped = json.loads((ROOT / "examples" / "ds_configs" / "zero3_bf16.json").read_text())
    assert ds["zero_optimization"]["reduce_bucket_size"] == shipped["zero_optimization"]["reduce_bucket_size"]
    assert ds["train_micro_batch_size_per_gpu"] == got["micro_batch"] and ds["bf16"] == {"enabled": True}
    o, a, p = got["optim"], got["apt"], got["parallel"]
    assert got["model"]["preset"] == "8b" and got["precision"] == "bf16" and got["data"]["max_text_len"] == 512
    assert p["engine"] == "deepspeed" and p["zero_stage"] == 3 and p["activation_checkpointing"] is True
    if name == "pretrain_apt_image.sh":
        assert (got["stage"], got["global_batch"], got["steps"]) == ("apt_image", 9062, 350)
        assert (o["lr"], o["d_lr"], o["optimizer"], o["alpha"], o["weight_decay"], o["grad_clip"]) == \
            (5e-6, None, "rmsprop", 0.9, 0.0, 0.0)  # d_lr None: D's learning rate is G's
        assert (a["r1_lambda"], a["r1_sigma"], a["timestep_shift"], a["ema_decay"]) == (100, 0.01, 1, 0.995)
        assert DiscriminatorConfig(head_layers=got["model"]["head_layers"]).resolve_layers(36) == (16, 26, 36)
        assert "global batch 9062 = 256 data-parallel ranks x 35-36 samples, 9 micro-steps of <= 4" in text
    elif name == "pretrain_apt_video.sh":
        assert (got["stage"], got["global_batch"], got["steps"]) == ("apt_video", 2048, 300)
        assert (o["lr"], o["d_lr"], o["optimizer"], o["alpha"], o["weight_decay"], o["grad_clip"]) == \
            (3e-6, None, "rmsprop", 0.9, 0.0, 0.0)
        assert (a["r1_lambda"], a["r1_sigma"], a["timestep_shift"], a["ema_decay"]) == (100, 0.1, 12, 0.995)
        assert DiscriminatorConfig(head_layers=got["model"]["head_layers"]).resolve_layers(36) == (16, 26, 36)
        assert "world=1024 (tp=1 x sp=2 x dp=512 x pp=1)" in text
        assert "global batch 2048 = 512 data-parallel ranks x 4 samples" in text
    elif name == "consistency_distill.sh":
        assert got["stage"] == "cd" and got["cd"]["cfg_scale"] == 7.5
    else:
        assert got["stage"] == "flow" and o["optimizer"] == "adamw"


@pytest.mark.parametrize("entry", ["bash", sys.executable])
def test_missing_inputs_are_named(tmp_path, entry):
    p = _run([entry, ROOT / "examples" / "pretrain_apt_video.sh"], _env(tmp_path), timeout=60)
    assert p.returncode == 2
    assert "error: set DATA_PATH" in p.stderr and "DEBUG=1" in p.stderr


# ---- the launch paths, end to end on CPU ---------------------------------------------------------------
def _check_run(run, stage, steps=2):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == steps
    assert all(json.loads(line)["finite"] for line in lines)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["stage"] == stage and cfg["model"]["preset"] == "debug" and cfg["precision"] == "fp32"
    assert (run / "checkpoints" / f"step-{steps:08d}").is_dir()


def test_deepspeed_launcher_runs_the_script(tmp_path):
    """The headline line: the DeepSpeed launcher runs the script with python on 2 local ranks."""
    ds = shutil.which("deepspeed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if ds is None:
        pytest.skip("the deepspeed launcher is not installed")
    from megatron_apt.models import build_mmdit
    from megatron_apt.checkpoint.model_dir import save_mmdit

    # the script builds these itself when absent (test_torchrun_path covers that); made here to save time
    models = tmp_path / "debug_models"
    save_mmdit(build_mmdit("debug", zero_init=False, seed=1), models / "diffusion")
    save_mmdit(build_mmdit("debug", zero_init=False, seed=2), models / "init", kind="consistency")
    run = tmp_path / "run"
    env = _env(tmp_path, DEBUG=1)
    p = _run([ds, "--num_gpus", 2, "--master_port", _free_port(), ROOT / "examples" / "pretrain_apt_video.sh",
              f"run_dir={run}"], env, timeout=240, cwd=tmp_path)
    _ok(p)
    _check_run(run, "apt_video")
    assert (run / "export" / "generator_ema" / "model.safetensors").is_file()
    assert (run / "export" / "discriminator" / "model.safetensors").is_file()


def test_torchrun_path(tmp_path):
    """`bash script` with no launcher around it: torchrun on this node (GPUS_PER_NODE ranks)."""
    run = tmp_path / "run"
    env = _env(tmp_path, DEBUG=1, GPUS_PER_NODE=2, MASTER_PORT=_free_port())
    p = _ok(_run(["bash", ROOT / "examples" / "pretrain_diffusion.sh", f"run_dir={run}"], env, timeout=240))
    assert "torch.distributed.run --nnodes 1 --node_rank 0 --nproc_per_node 2" in p.stderr
    _check_run(run, "flow")
    assert (run / "export" / "model_ema" / "model.safetensors").is_file()
    assert (tmp_path / "debug_models" / "init" / "config.json").is_file()  # DEBUG builds the debug models once


# ---- the DeepSpeed config ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples" / "ds_configs").glob("*.json")))
@pytest.mark.parametrize("yaml_name", sorted(set(SCRIPTS.values())))
def test_shipped_ds_configs_merge_over_what_the_trainer_builds(name, yaml_name):
    """Every shipped JSON is a real input for the 8b configs: it restates (never contradicts) what the trainer
    controls, and each of its settings is in the merged config the engines get."""
    from megatron_apt.config.train import load_config
    from megatron_apt.trainer.ds_config import built_for, load_user_config, training_ds_config

    path = ROOT / "examples" / "ds_configs" / name
    cfg = load_config(ROOT / "examples" / "configs" / yaml_name,
                      ["data.synthetic=true", f"parallel.deepspeed_config={path}"])
    merged = training_ds_config(cfg, dp_size=512)
    user = load_user_config(path)
    assert user and not any(k.startswith("_") for k in user)

    def leaves(d, pre=""):
        for k, v in d.items():
            yield from leaves(v, f"{pre}{k}.") if isinstance(v, dict) else [(f"{pre}{k}", v)]

    got = dict(leaves(merged))
    for key, value in leaves(user):
        assert got[key] == value, key
    for key, value in leaves(built_for(cfg)):  # the trainer's own settings survive unless the file tunes them
        assert key in dict(leaves(user)) or got[key] == value, key
