"""Bad configuration and command-line input: one line `error: ...` naming the problem and exit status 2, no
traceback and nothing written; and the override forms that used to be misread now give the right values."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_apt.config.train import load_config
from tests.helpers.ranks import run_tool

ROOT = Path(__file__).resolve().parents[2]
SYN = ["stage=flow", "data.synthetic=true", "data.synthetic_shape=[4,1,8,8]", "precision=fp32", "parallel.engine=torch",
       "global_batch=2", "micro_batch=2", "steps=1"]


def _pretrain(argv):
    spec = importlib.util.spec_from_file_location("pretrain_apt", ROOT / "pretrain_apt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return mod.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exit, as the command line sees it
        return e.code


def _yaml(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    return f


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    from megatron_apt.models import build_mmdit
    from megatron_apt.checkpoint.model_dir import save_mmdit

    d = tmp_path_factory.mktemp("g") / "g"
    save_mmdit(build_mmdit("debug", zero_init=False, seed=3), d, kind="generator")
    return d


# case -> (how to run it, what the error line must say). "train" runs pretrain_apt.py in this process (the
# error comes before any process group), "subprocess" runs it as users do, "generate" runs tools/generate.py.
CASES = {
    "override_list_of_numbers": ("train", ["optim.betas=abc"], "cannot parse optim.betas='abc': expected a list of numbers"),
    "override_list_of_ints": ("train", ["model.head_layers=16,b"], "model.head_layers='16,b': expected a list of ints"),
    "override_nested_type": ("train", ["model.overrides.num_layers=six"],
                             "model.overrides.num_layers='six': expected an int"),
    "override_nested_unknown": ("train", ["model.overrides.num_layer=6"], "unknown config key 'model.overrides.num_layer'"),
    "override_nested_invalid": ("train", ["model.overrides.hidden_size=33"], "not divisible by num_heads"),
    "yaml_float_for_int": ("train", ["--config", "YAML:global_batch: 4.5\n"], "global_batch=4.5: expected an int"),
    "yaml_list_for_float": ("train", ["--config", "YAML:optim:\n  lr: [1, 2]\n"],
                            "optim.lr=[1, 2]: expected a finite float"),
    "yaml_syntax": ("train", ["--config", "YAML:stage: flow\noptim:\n  lr: [1, 2\n"], "c.yaml:4:1: YAML syntax error"),
    "yaml_not_mapping": ("train", ["--config", "YAML:- 1\n- 2\n"], "must hold a mapping"),
    "log_every_zero": ("train", ["log_every=0"], "log_every must be >= 1, got 0"),
    "steps_negative": ("train", ["steps=-1"], "steps must be >= 0, got -1"),
    "deepspeed_bf16_unknown": ("train", ["parallel.deepspeed_bf16=half"],
                               "parallel.deepspeed_bf16 must be 'params' or 'autocast', got 'half'"),
    "lr_not_finite": ("train", ["optim.lr=inf"], "optim.lr='inf': expected a finite float"),
    "unknown_flag": ("train", ["--bogus"], "unrecognized arguments: --bogus"),
    "run_dir_not_writable": ("subprocess", ["run_dir=FILE/run"], "Not a directory"),
    "generate_zero_size": ("generate", ["--resolution", "0x0"], "--resolution must be positive, got 0x0"),
    "generate_zero_frames": ("generate", ["--frames", "0"], "--frames must be positive, got 0"),
    "generate_too_large": ("generate", ["--resolution", "100000x100000", "--frames", "8"], "GiB is free"),
    "generate_not_divisible": ("generate", ["--resolution", "9x8", "--frames", "1"], "not divisible by the patch"),
    "generate_out_not_writable": ("generate", ["--resolution", "8x8", "--frames", "1", "--out", "FILE/out"],
                                  "Not a directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_error_and_status_2(case, tmp_path, capsys, generator_dir):
    how, args, expect = CASES[case]
    blocker = tmp_path / "FILE"  # a file where a folder is needed: fails for any user, root included
    blocker.write_text("x")
    args = [a.replace("FILE", str(blocker)) for a in args]
    args = [str(_yaml(tmp_path, a[5:])) if a.startswith("YAML:") else a for a in args]
    if how == "train":
        rc = _pretrain(SYN + [f"run_dir={tmp_path}/run"] + args)
        err = capsys.readouterr().err
    elif how == "subprocess":
        r = subprocess.run([sys.executable, str(ROOT / "pretrain_apt.py"), *SYN, *args], capture_output=True, text=True,
                           env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
        rc, err = r.returncode, r.stderr
        assert "Traceback" not in err, err
        err = "\n".join(line for line in err.splitlines() if line.startswith("error:"))  # library warnings aside
    else:
        out = [] if "--out" in args else ["--out", tmp_path / "out"]
        rc = run_tool("generate", "--model", generator_dir, "--prompt", "a digit", *out, *args)
        err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_overrides_parse_like_yaml(tmp_path, capsys):
    cfg = load_config(None, ["data.synthetic=true", "model.head_layers=16,26", "model.overrides.num_layers=6",
                             "model.overrides.patch_size=[1,4,4]", "optim.betas=0.5,0.9", "optim.eps=1e-6",
                             "parallel.pipeline_layers=[3]", "model.init=null"])
    assert cfg.model.head_layers == [16, 26] and cfg.optim.betas == [0.5, 0.9] and cfg.optim.eps == 1e-6
    assert cfg.model.overrides == {"num_layers": 6, "patch_size": [1, 4, 4]} and cfg.model.init is None
    assert cfg.parallel.pipeline_layers == [3]
    cfg = load_config(None, ["data.synthetic=true", "model.head_layers=[16, 26]", "model.overrides={num_layers: 6}",
                             "model.overrides.hidden_size=64"])  # a dotted key adds to the mapping
    assert cfg.model.head_layers == [16, 26] and cfg.model.overrides == {"num_layers": 6, "hidden_size": 64}
    f = _yaml(tmp_path, "optim:\n  lr: 3e-6\napt:\n  timestep_shift: 12\nmodel:\n  overrides:\n    num_layers: 6\n")
    cfg = load_config(f, ["data.synthetic=true"])  # PyYAML reads 3e-6 as a string: still a float here
    assert cfg.optim.lr == 3e-6 and cfg.apt.timestep_shift == 12.0 and cfg.model.overrides == {"num_layers": 6}
    # --dry-run anywhere among the arguments; the nested override reaches the model
    assert _pretrain(["data.synthetic=true", "model.overrides.num_layers=6", "--dry-run", "steps=3"]) == 0
    out = capsys.readouterr().out
    assert "num_layers: 6" in out and "steps: 3" in out

