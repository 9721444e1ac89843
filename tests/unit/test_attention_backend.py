"""model.attention_backend / --attention-backend: known names only, one this machine cannot run is a clear
error, an explicit kernel computes the same attention, auto's choice is reported."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_apt.models import attention as A

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore():
    before = A.attention_backend()
    yield
    A._BACKEND = before


def test_cpu_backends_compute_the_same_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 4, 16, generator=g) for _ in range(3))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    assert A.set_attention_backend("auto", "cpu") == "flash"  # PyTorch's CPU choice, reported
    ref = A.attention(q, k, v, mask)
    for name in ("math", "flash"):
        assert A.set_attention_backend(name, "cpu") == name and A.attention_backend() == name
        torch.testing.assert_close(A.attention(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)
    # the masked keys are ignored by every kernel
    A.set_attention_backend("math", "cpu")
    k2 = k.clone()
    k2[1, 7:] = 100.0
    torch.testing.assert_close(A.attention(q, k2, v, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, why", [
    ("cudnn", "attention backend 'cudnn' is not available: PyTorch's cudnn SDPA kernel is not available on cpu"),
    ("efficient", "attention backend 'efficient' is not available: PyTorch's efficient SDPA kernel is not available"),
    ("flash_attn", "attention backend 'flash_attn' is not available: "),
    ("flash-attention", "unknown attention backend 'flash-attention'; choose one of auto, cudnn, flash, flash_attn"),
])
def test_unavailable_or_unknown_backends_are_clear_errors(name, why):
    A.set_attention_backend("math", "cpu")
    with pytest.raises(ValueError) as e:
        A.set_attention_backend(name, "cpu")
    assert str(e.value).startswith(why) and "\n" not in str(e.value)
    assert A.attention_backend() == "math"  # unchanged


def test_config_field_and_tool_flag():
    from megatron_apt.config.train import load_config

    assert load_config(None, ["data.synthetic=true"]).model.attention_backend in A.ATTENTION_BACKENDS
    assert load_config(None, ["data.synthetic=true", "model.attention_backend=math"]).model.attention_backend == "math"
    with pytest.raises(ValueError, match="model.attention_backend must be one of auto, cudnn, flash, flash_attn, "
                                         "efficient, math, got 'fast'"):
        load_config(None, ["data.synthetic=true", "model.attention_backend=fast"])
    # a tool asked for a kernel this CPU machine lacks stops with one line (before loading any model)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--model", "/nonexistent", "--prompt",
                        "x", "--out", "/tmp/unused", "--device", "cpu", "--attention-backend", "cudnn"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: attention backend 'cudnn' is not available")
