"""The package as pip sees it: `pip install -e .` into a clean virtual environment gives console scripts
that work from any directory, tools import the installed package (no sys.path edits), pyproject.toml's
requires-python is what the pinned requirements need, and its ranges admit every pin."""

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SCRIPTS = {"megatron-apt-train", "megatron-apt-preprocess", "megatron-apt-toy-data", "megatron-apt-convert",
           "megatron-apt-generate", "megatron-apt-evaluate", "megatron-apt-profile", "megatron-apt-plan",
           "megatron-apt-plot"}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_ranges_admit_the_pins_and_requires_python_is_what_they_need():
    pins = _pins()
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    reqs += [Requirement(r) for r in PROJECT["optional-dependencies"]["eval"]]
    for r in reqs:
        name = canonicalize_name(r.name)
        if name in pins:
            assert r.specifier.contains(pins[name]), f"{r} excludes the pin {name}=={pins[name]}"
    assert {canonicalize_name(r.name) for r in reqs} - set(pins) == set(), "every dependency has a pin"
    assert set(PROJECT["optional-dependencies"]) == {"gpu", "eval", "dev"}
    assert {canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"]["dev"]} >= {
        "megatron-apt", "pytest", "pytest-timeout"}
    assert set(PROJECT["scripts"]) == SCRIPTS
    # the oldest Python requires-python admits is one that every pinned package supports, and the one
    # before it is refused by at least one of them
    ours = SpecifierSet(PROJECT["requires-python"])
    oldest = next(f"3.{m}" for m in range(8, 20) if ours.contains(f"3.{m}"))
    needs = {name: metadata.metadata(name).get("Requires-Python") for name in pins}
    needs = {n: SpecifierSet(s) for n, s in needs.items() if s}
    assert all(s.contains(oldest) for s in needs.values()), {n: str(s) for n, s in needs.items()}
    before = f"3.{int(oldest.split('.')[1]) - 1}"
    assert any(not s.contains(before) for s in needs.values())


def test_tools_import_the_installed_package():
    scripts = sorted((ROOT / "tools").glob("*.py")) + [ROOT / "pretrain_apt.py"]
    assert not (ROOT / "tools" / "_bootstrap.py").exists()
    for f in scripts:
        text = f.read_text()
        assert "sys.path" not in text and "_bootstrap" not in text, f.name
        assert re.search(r"from megatron_apt\.cli\.\w+ import main", text), f.name


@pytest.mark.integration
def test_clean_venv_install_gives_working_console_scripts(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    # the dependencies (and pip, setuptools) already installed from the pins stand in for the downloads
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", DS_ACCELERATOR="cpu",
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", f"{ROOT}[dev]"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert {p.name for p in (venv / "bin").iterdir()} >= SCRIPTS
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*cmd):
        p = subprocess.run([str(c) for c in cmd], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, f"{cmd}: {p.stdout[-2000:]}{p.stderr[-2000:]}"
        return p.stdout

    found = run(py, "-c", "import megatron_apt; print(megatron_apt.__file__)").strip()
    assert found == str(ROOT / "megatron_apt" / "__init__.py")  # this checkout, from another directory
    out = run("megatron-apt-plan", "--stage", "apt_image", "--gpus", "256")
    assert "fits" in out and "350 updates" in out
    out = run("megatron-apt-train", "--dry-run", "data.synthetic=true",
              f"parallel.deepspeed_config={ROOT / 'examples' / 'ds_configs' / 'zero3_bf16.json'}")
    assert "# layout: world=1" in out and '"reduce_bucket_size": 500000000' in out
    out = run(py, ROOT / "tools" / "plan.py", "--stage", "apt_video", "--gpus", "1024")  # the scripts, too
    assert "fits" in out
