"""The APT hand-offs: `make_apt_init` (the generator from the consistency-distilled G-hat, the discriminator
from the original diffusion weights plus fresh cross-attention heads, §3.2-3.3) and `export_generator` (the
one-step generator of a training checkpoint as an inference model directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_apt.config.model import MMDiTConfig
from megatron_apt.checkpoint.model_dir import CONFIG_NAME
from megatron_apt.utils import atomic_directory, get_logger
from megatron_apt.checkpoint.common import ConversionError, DEFAULT_SEED, DIFFUSION_KINDS, Echo, GENERATOR_KINDS, HEAD_SEED_OFFSET, VerificationError, parse_dtype, quiet, build_meta_model, check_output, check_preset, check_state, expected_shapes
from megatron_apt.checkpoint.consolidate import RECOMPUTED_NOTE, read_buffers
from megatron_apt.checkpoint.model_dir import instantiate, model_meta, read_model_state, write_model_files
from megatron_apt.checkpoint.training import TrainingCheckpoint
from megatron_apt.checkpoint.verify import Report, verify_dir, written

log = get_logger("megatron_apt.checkpoint")

# ---- APT initialisation --------------------------------------------------------------------------------
def _diff_configs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def fresh_heads(cfg: MMDiTConfig, head_layers=None, head_mlp_ratio: float = 4.0, seed: int = DEFAULT_SEED,
                dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """Fresh discriminator heads (`Discriminator.init_heads`) without materialising the backbone. Drawn from
    torch.Generator().manual_seed(seed + 17), as the APT stage draws them for a run with this seed."""
    model = build_meta_model(cfg, "discriminator", head_layers, head_mlp_ratio)
    for m in (model.heads, model.norm, model.proj):
        m.to_empty(device="cpu")
    model.init_heads(generator=torch.Generator().manual_seed(seed + HEAD_SEED_OFFSET))
    state = {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    return state, tuple(model.head_layers)


def make_apt_init(diffusion: str | Path, consistency: str | Path, output: str | Path, head_layers=None,
                  seed: int = DEFAULT_SEED, head_mlp_ratio: float = 4.0, overwrite: bool = False,
                  expect_preset: str | None = None, verify: bool = False, echo: Echo = quiet) -> Report:
    """`output/generator` (kind generator: the consistency-distilled G-hat, tensors unchanged) and
    `output/discriminator` (kind discriminator: backbone = the diffusion weights bit for bit, fresh heads)."""
    check_output(output, [diffusion, consistency], overwrite)
    dmeta, dstate = read_model_state(diffusion, expect_kind=DIFFUSION_KINDS)
    cmeta, cstate = read_model_state(consistency, expect_kind=GENERATOR_KINDS)
    check_preset(dmeta["model"], expect_preset, str(diffusion))
    check_preset(cmeta["model"], expect_preset, str(consistency))
    diff = _diff_configs(MMDiTConfig.from_dict(dmeta["model"]).to_dict(),
                         MMDiTConfig.from_dict(cmeta["model"]).to_dict())
    if diff:
        raise ConversionError(f"the diffusion model {diffusion} and the consistency model {consistency} have different "
                              f"shapes (mismatched shapes): {', '.join(diff[:6])}")
    cfg = MMDiTConfig.from_dict(dmeta["model"])
    bdtypes = {v.dtype for v in dstate.values()}
    heads, layers = fresh_heads(cfg, head_layers, head_mlp_ratio, seed,
                                dtype=next(iter(bdtypes)) if len(bdtypes) == 1 else torch.float32)
    dstate_full = {**{f"backbone.{k}": v for k, v in dstate.items()}, **heads}
    gmeta = model_meta("generator", cmeta["model"], {"source": {"consistency": str(consistency), "apt_init": True}})
    dmeta_out = model_meta("discriminator", dmeta["model"], {
        "head_layers": list(layers), "head_mlp_ratio": float(head_mlp_ratio),
        "source": {"diffusion": str(diffusion), "apt_init": True, "head_seed": seed + HEAD_SEED_OFFSET}})
    check_state(dstate_full, expected_shapes(cfg, "discriminator", layers, head_mlp_ratio), "discriminator")
    with atomic_directory(output, overwrite=overwrite) as tmp:
        write_model_files(tmp / "generator", cstate, gmeta)
        write_model_files(tmp / "discriminator", dstate_full, dmeta_out)
        if verify:
            verify_dir(tmp / "generator", cstate, echo, "generator", reference_model=instantiate(cmeta, cstate))
            verify_dir(tmp / "discriminator", dstate_full, echo, "discriminator")
            _m, back = read_model_state(tmp / "discriminator")
            if any(not torch.equal(back[f"backbone.{k}"], v) for k, v in dstate.items()):
                raise VerificationError("discriminator backbone differs from the diffusion weights")
            echo(f"verify: discriminator backbone bit-identical to {diffusion} ({len(dstate)} tensors)")
    report = Report(f"APT initialisation -> {output}")
    report.outputs.append(written(Path(output) / "generator", cstate, gmeta, f"from {consistency}"))
    report.outputs.append(written(Path(output) / "discriminator", dstate_full, dmeta_out,
                                   f"backbone from {diffusion}, heads at layers {list(layers)}"))
    report.changes.append(f"generator: kind {cmeta.get('kind')!r} -> 'generator', tensors unchanged")
    report.changes.append(f"discriminator: kind {dmeta.get('kind')!r} -> 'discriminator', 'backbone.' prefix added, "
                          f"{len(heads)} fresh head tensors (seed {seed} + {HEAD_SEED_OFFSET})")
    return report


# ---- export the generator ------------------------------------------------------------------------------
def export_generator(src: str | Path, output: str | Path, ema: bool = True, dtype: str | torch.dtype | None = None,
                     overwrite: bool = False, expect_preset: str | None = None, verify: bool = False,
                     buffers_from: str | Path | None = None, echo: Echo = quiet) -> Report:
    """The one-step generator as an inference model directory (kind "generator") from a run directory (its
    latest checkpoint), a step-N checkpoint (G, or a cd run's consistency model; EMA by default) or a model
    directory of kind generator / consistency."""
    src_p = Path(src)
    dt = parse_dtype(dtype)
    notes = []
    if (src_p / CONFIG_NAME).is_file():
        check_output(output, [src_p], overwrite)
        meta, state = read_model_state(src_p, expect_kind=GENERATOR_KINDS)
        cfg_dict = meta["model"]
        source = {"model_dir": str(src_p), "kind": meta.get("kind")}
        notes.append(f"from model directory {src_p} (kind {meta.get('kind')!r}; --ema/--raw do not apply)")
    else:
        ckpt = TrainingCheckpoint(src_p)
        inputs = [ckpt.path] + ([ckpt.path.parent] if ckpt.path.parent.name == "checkpoints" else [])
        check_output(output, inputs + ([buffers_from] if buffers_from else []), overwrite)
        echo(ckpt.describe())
        if "G" in ckpt.engines:
            engine = "G"
        elif "model" in ckpt.engines and ckpt.stage == "cd":
            engine = "model"
        else:
            raise ConversionError(f"checkpoint {ckpt.path} (stage {ckpt.stage}) holds no one-step generator "
                                  f"(models {ckpt.engines}; kind mismatch)")
        if ema and not ckpt.has_ema(engine):
            raise ConversionError(f"checkpoint {ckpt.path}: model {engine!r} has no EMA (pass --raw)")
        buffers = read_buffers(buffers_from)
        state = ckpt.product_state(engine, ema, ckpt.state_dict(engine, ema, buffers))
        notes += [f"{b} {RECOMPUTED_NOTE}" for b in ckpt.recomputed_buffers(engine, buffers)]
        cfg_dict = ckpt.meta["models"][engine]["model"]
        source = {"checkpoint": str(ckpt.path), "step": ckpt.step, "engine": engine, "ema": ema, "stage": ckpt.stage}
        notes.append(f"{engine} {'EMA' if ema else 'raw weights'} of step {ckpt.step}, consolidated from "
                     f"{ckpt.world} rank files (tp {ckpt.tp})")
    check_preset(cfg_dict, expect_preset, str(src_p))
    src_state = state
    if dt is not None:
        state = {k: v.to(dt) for k, v in state.items()}
        notes.append(f"cast to {str(dt).replace('torch.', '')}")
    meta_out = model_meta("generator", cfg_dict, {"source": source})
    with atomic_directory(output, overwrite=overwrite) as tmp:
        write_model_files(tmp, state, meta_out)
        if verify:
            from megatron_apt.checkpoint.model_dir import load_mmdit

            load_mmdit(tmp, expect_kind=("generator",))  # what generation code does
            ref = instantiate(meta_out, src_state) if dt in (None, torch.float32) else None
            verify_dir(tmp, state, echo, "generator", reference_model=ref)
    report = Report(f"exported the one-step generator -> {output}")
    report.outputs.append(written(Path(output), state, meta_out))
    report.changes += notes
    return report

