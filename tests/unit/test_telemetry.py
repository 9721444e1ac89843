"""The run's telemetry without a trainer: wandb's mode (the user's, else online when logged in, else
offline), the status line, and the package logger's rank rule."""

import logging
import math
from types import SimpleNamespace

import pytest

from megatron_apt.trainer import telemetry as T
from megatron_apt.utils import setup_logging


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # an empty home: no `wandb login`
    return tmp_path / "netrc"


def test_wandb_mode_follows_the_user(no_login, monkeypatch):
    assert T.resolve_wandb_mode(None) == "offline"  # nobody logged in
    no_login.write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    assert T.wandb_logged_in() and T.resolve_wandb_mode(None) == "online"  # `wandb login` wrote this
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert T.resolve_wandb_mode(None) == "offline"  # logged in elsewhere only
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert T.resolve_wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert T.resolve_wandb_mode(None) == "offline"  # the environment variable, wandb's legacy spelling too
    assert T.resolve_wandb_mode("disabled") == "disabled"  # the config's wandb_mode wins


def test_disabled_wandb_writes_nothing(no_login, tmp_path):
    cfg = SimpleNamespace(wandb_project="p", wandb_mode="disabled", steps=3, stage="flow", plots=False)
    t = T.Telemetry(cfg, tmp_path / "run", rank=0)
    t.start(0)
    assert t.wandb is None and not (tmp_path / "run" / T.WANDB_ID_FILE).exists()
    t.finish()
    other = T.Telemetry(SimpleNamespace(**{**cfg.__dict__, "wandb_mode": "offline"}), tmp_path / "r1", rank=1)
    other.start(0)  # not rank 0: no bar, no wandb
    assert other.bar is None and other.wandb is None and not (tmp_path / "r1").exists()


def test_status_line_survives_non_finite_values():
    line = T.status_line("apt_image", {"step": 3, "loss": math.nan, "d_loss": 1.5, "ar1": None,
                                       "samples_per_s": 2.0, "tflops": math.nan, "mfu": math.nan,
                                       "peak_mem_gb": 1.25}, 10)
    assert line.startswith("[apt_image] step      3/10 loss       nan d_loss    1.5000 ar1       nan |")
    assert line.endswith("| mem   1.25 GB")


def test_rank_rule_of_the_package_logger(monkeypatch):
    pkg = logging.getLogger("megatron_apt")
    level = pkg.level
    try:
        setup_logging(rank=1, all_ranks=False)
        assert pkg.getEffectiveLevel() == logging.WARNING
        ds = logging.getLogger("DeepSpeed")
        rec = logging.LogRecord("DeepSpeed", logging.INFO, __file__, 1, "x", None, None)
        assert not all(f.filter(rec) for f in ds.filters)  # DeepSpeed's INFO dropped on rank 1
        setup_logging(rank=1, all_ranks=True)
        assert pkg.getEffectiveLevel() == logging.INFO and all(f.filter(rec) for f in ds.filters)
        monkeypatch.setenv("MEGATRON_APT_LOG_ALL_RANKS", "1")
        setup_logging(rank=1)
        assert pkg.getEffectiveLevel() == logging.INFO
        setup_logging(rank=0, all_ranks=False)
        assert pkg.getEffectiveLevel() == logging.INFO
    finally:
        setup_logging(rank=0, all_ranks=False)
        pkg.setLevel(level)
