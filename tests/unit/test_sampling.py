"""Multi-step sampling uses the timestep shift the model was trained with (recorded at export), and limits
classifier-free guidance to a guidance interval when one is given."""

import math

import pytest
import torch

from megatron_apt.inference.pipeline import Generator
from megatron_apt.models.build import build_mmdit
from megatron_apt.checkpoint.model_dir import save_mmdit


def _model(tmp_path, name, kind="diffusion", training=None):
    m = build_mmdit("debug", seed=0, zero_init=False)
    extra = {"training": training} if training is not None else None
    return str(save_mmdit(m, tmp_path / name, kind=kind, extra=extra))


def _shift(t, s):
    return s * t / (1 + (s - 1) * t)


def test_recorded_shift_is_used_and_can_be_overridden(tmp_path):
    d = _model(tmp_path, "d", training={"stage": "flow", "shift": 3.0})
    g = Generator(d)
    assert g.shift == 3.0 and g.shift_source == "recorded"
    ts = g.timesteps(4, (1, 4, 1, 8, 8))
    assert ts == pytest.approx([_shift(t, 3.0) for t in (1.0, 0.75, 0.5, 0.25, 0.0)])
    assert Generator(d, shift=1.0).timesteps(4, (1, 4, 1, 8, 8)) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # the shift changes what the sampler produces
    z = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    text, mask = torch.randn(1, 3, 24), torch.ones(1, 3, dtype=torch.bool)
    a = g.sample_latents(z, text, mask, steps=4)
    b = Generator(d, shift=1.0).sample_latents(z, text, mask, steps=4)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="shift"):
        Generator(d, shift=0.0)


def test_resolution_dependent_shift_and_old_directories(tmp_path):
    d = _model(tmp_path, "r", training={"stage": "flow", "shift": None})  # SD3's sqrt(tokens / 256)
    g = Generator(d)
    tokens = 1 * (64 // 2) * (64 // 2)
    assert g.shift_for((1, 4, 1, 64, 64)) == pytest.approx(math.sqrt(tokens / 256))
    old = Generator(_model(tmp_path, "old"))  # written before shifts were recorded: uniform steps
    assert old.shift == 1.0 and old.shift_source == "default"


def test_one_step_generators_are_not_shifted(tmp_path):
    g = Generator(_model(tmp_path, "g", kind="generator", training={"stage": "apt_video"}))
    assert g.timesteps(2, (1, 4, 1, 8, 8)) == pytest.approx([1.0, 0.5, 0.0])


def test_guidance_interval_guides_only_the_steps_inside_it():
    from megatron_apt.inference.sampling import euler

    calls = []

    def vc(x, t):
        return torch.full_like(x, 1.0) * t

    def vu(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    z = torch.zeros(2, 3)
    ts = [1.0, 0.75, 0.5, 0.25, 0.0]
    # by hand: dx = (b - a) v with v = 4 t inside (0, 0.5] and v = t outside
    got = euler(vc, z, ts, 4.0, vu, (0.0, 0.5))
    want = sum((b - a) * (4 * a if 0 < a <= 0.5 else a) for a, b in zip(ts, ts[1:]))
    torch.testing.assert_close(got, torch.full_like(z, want))
    assert calls == [0.5, 0.25]  # the unconditional pass runs only inside the interval
    full = euler(vc, z, ts, 4.0, vu)
    torch.testing.assert_close(full, torch.full_like(z, sum((b - a) * 4 * a for a, b in zip(ts, ts[1:]))))


def test_guided_velocity_per_sample_and_bad_intervals():
    from megatron_apt.models.conditioning import (
        check_guidance_interval, guidance_scale, guided_velocity, parse_guidance_interval,
    )

    vc, vu = torch.ones(3, 2), torch.zeros(3, 2)
    t = torch.tensor([0.9, 0.5, 0.1])
    out = guided_velocity(vc, vu, guidance_scale(7.5, t, (0.2, 0.9)))
    assert out[:, 0].tolist() == [7.5, 7.5, 1.0]
    assert guidance_scale(7.5, 0.2, (0.2, 0.9)) == 1.0 and guidance_scale(7.5, 0.9, (0.2, 0.9)) == 7.5
    assert parse_guidance_interval("0-0.5") == (0.0, 0.5)
    for bad in ("0.5-0.2", "0-1.5", "0.5", "a-b"):
        with pytest.raises(ValueError, match="guidance interval"):
            parse_guidance_interval(bad)
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        check_guidance_interval((0.3, 0.3))
