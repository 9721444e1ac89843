"""`consolidate`: a training checkpoint `RUN/checkpoints/step-N` (DeepSpeed ZeRO-3 flat partitions or plain
torch tensors, on every tensor-parallel and pipeline rank) -> consolidated model directories, raw or EMA."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_apt.checkpoint.model_dir import WEIGHTS_NAME
from megatron_apt.utils import atomic_directory, check_plain_name, get_logger, progress
from megatron_apt.checkpoint.common import ConversionError, Echo, parse_dtype, quiet, build_meta_model, check_output, check_preset
from megatron_apt.checkpoint.model_dir import meta_model_args, model_meta, read_model_state, write_model_files
from megatron_apt.checkpoint.training import TrainingCheckpoint
from megatron_apt.checkpoint.verify import Report, verify_dir, written

log = get_logger("megatron_apt.checkpoint")

# ---- consolidate ---------------------------------------------------------------------------------------
def read_buffers(path: str | Path | None) -> dict[str, torch.Tensor] | None:
    """The persistent buffers (by MMDiT name, e.g. "pos_table") of a model directory: for ZeRO-3 checkpoints,
    which hold only parameters, the training run's init model gives the exact tables the run used."""
    if path is None:
        return None
    meta, state = read_model_state(path)
    cfg, kind, layers, ratio = meta_model_args(meta, {k: v.shape for k, v in state.items()})
    names = {n for n, _ in build_meta_model(cfg, kind, layers, ratio).named_buffers()}
    out = {}
    for n in names:
        short = n[len("backbone."):] if n.startswith("backbone.") else n
        out[short] = state[n]
    return out


RECOMPUTED_NOTE = ("recomputed from the model config (ZeRO-3 checkpoints hold no buffers; it can differ from an "
                    "imported table in the last bits: --buffers-from INIT_MODEL_DIR copies the run's own)")


PRODUCT_NAMES = {"G": ("generator", "generator_ema"), "D": ("discriminator", "discriminator_ema"),
                 "model": ("model", "model_ema")}


def consolidate(src: str | Path, output: str | Path, model: str | None = None, ema: bool = False,
                dtype: str | torch.dtype | None = None, overwrite: bool = False, expect_preset: str | None = None,
                verify: bool = False, buffers_from: str | Path | None = None, echo: Echo = quiet) -> Report:
    """A training checkpoint (a step-N directory, or a run directory: its latest) -> model directories.

    With `model` ("G", "D" or "model") `output` is that model's directory (raw weights, or its EMA with
    `ema`). Without it, `output` gets one sub-directory per product, named as the trainer's export names
    them: generator, generator_ema, discriminator (APT); model, model_ema (flow / cd)."""
    ckpt = TrainingCheckpoint(src)
    inputs = [ckpt.path] + ([ckpt.path.parent] if ckpt.path.parent.name == "checkpoints" else [])
    check_output(output, inputs + ([buffers_from] if buffers_from else []), overwrite)
    dt = parse_dtype(dtype)
    buffers = read_buffers(buffers_from)
    echo(ckpt.describe())
    if model is not None:
        ckpt._need(model)
        if ema and not ckpt.has_ema(model):
            raise ConversionError(f"checkpoint {ckpt.path}: model {model!r} has no EMA "
                                  "(drop --ema for the raw weights)")
        products = [("", model, ema)]
    else:
        if ema:
            raise ConversionError("--ema selects one model's EMA: give --model too (without --model every "
                                  "product, EMA ones included, is written)")
        products = []
        for e in ckpt.engines:
            names = PRODUCT_NAMES.get(e, (e, f"{e}_ema"))
            products.append((names[0], e, False))
            if ckpt.has_ema(e):
                products.append((names[1], e, True))
    for sub, _e, _ema in products:  # names from trainer.json become folder names: plain names only
        if sub:
            check_plain_name(sub, f"checkpoint {ckpt.path}: product name")
    for e in {p[1] for p in products}:
        check_preset(ckpt.meta["models"][e]["model"], expect_preset, f"checkpoint {ckpt.path} model {e!r}")
    report = Report(f"consolidated {ckpt.path} (step {ckpt.step}) -> {output}")
    bar = progress(total=sum(ckpt.planned_reads(e) for _, e, _ in products), desc="consolidate", unit="tensor")
    ckpt.bar = bar
    with bar, atomic_directory(output, overwrite=overwrite) as tmp:
        for sub, e, use_ema in products:
            bar.set_postfix_str(f"{e}{' EMA' if use_ema else ''}", refresh=False)
            full = ckpt.state_dict(e, use_ema, buffers)
            state = ckpt.product_state(e, use_ema, full)
            kind = ckpt.kind(e)
            lay = ckpt.layouts[e]
            extra = {"source": {"checkpoint": str(ckpt.path), "step": ckpt.step, "engine": e, "ema": use_ema,
                                "tp": ckpt.tp, "zero_world": lay.zero_world, "stage": ckpt.stage}}
            if kind == "discriminator":
                extra["head_layers"] = list(ckpt.head_layers(e) or [])
                extra["head_mlp_ratio"] = ckpt.head_mlp_ratio(e)
            meta = model_meta(kind, ckpt.config(e), extra)
            out_state = {k: v.to(dt) for k, v in state.items()} if dt is not None else state
            d = tmp / sub if sub else tmp
            if d.resolve().parent != tmp.resolve() and d != tmp:  # stays inside --output, whatever the name
                raise ConversionError(f"product {sub!r} would be written outside {output}")
            write_model_files(d, out_state, meta)
            label = f"{e}{' EMA' if use_ema else ''}"
            if verify:
                n = ckpt.check_against_rank_files(e, use_ema, full)
                echo(f"verify {label}: re-partitioned into the checkpoint's layout, {n} rank tensors bit-identical")
                verify_dir(d, out_state, echo, label)
            report.outputs.append(written(Path(output) / sub if sub else Path(output), out_state, meta,
                                           f"{label} of step {ckpt.step}"))
            report.changes.append(
                f"{label}: {len(lay.by_tp) * len(lay.by_tp[0])} rank files ({lay.kind}"
                + (f", ZeRO {lay.zero_world}" if lay.kind == "zero3" else "") + f", TP {ckpt.tp}"
                + (f", PP {ckpt.pp}" if ckpt.pp > 1 else "") + f") -> one {WEIGHTS_NAME}"
                + ("; 'backbone.' prefix dropped" if len(state) and next(iter(state)) not in full else "")
                + (f"; cast float32 -> {str(dt).replace('torch.', '')}" if dt not in (None, torch.float32) else "")
                + "".join(f"; {b} {RECOMPUTED_NOTE}" for b in ckpt.recomputed_buffers(e, buffers))
                + "".join(f"; {b} from {buffers_from}" for b in (buffers or {}) if ckpt.layouts[e].kind == "zero3"))
    return report
