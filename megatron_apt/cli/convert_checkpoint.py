"""Checkpoint conversions.

  import-diffusers  a diffusers SD3Transformer2DModel directory -> a megatron_apt model directory
  export-diffusers  an SD3-configured megatron_apt model directory -> a diffusers SD3Transformer2DModel dir
  consolidate       a training checkpoint (RUN/checkpoints/step-N, or RUN: its latest; ZeRO-3 partitions on
                    every tensor-parallel rank, or pipeline stages: PP -> 1) -> model directories (G, D, the
                    flow/cd model; raw or EMA). A pipeline run of any pp and tp starts from such a directory.
  reshard           a model directory <-> N tensor-parallel shard files (model-tp{r}-of-{N}.safetensors)
  make-apt-init     consistency-distilled G-hat + diffusion weights -> DIR/generator and DIR/discriminator
  export-generator  the one-step generator (EMA by default) of a run, checkpoint or model dir -> an
                    inference model directory of kind "generator"

  convert_checkpoint.py consolidate --input runs/apt_image --output ckpt/apt_image_step500 --verify
  convert_checkpoint.py consolidate --input runs/apt_image/checkpoints/step-00000350 --model G --ema --output g_ema
  convert_checkpoint.py reshard --input g_ema --output g_ema_tp2 --tp 2 --verify
  convert_checkpoint.py make-apt-init --diffusion diff_8b --consistency cd_8b --output apt_init --verify
  convert_checkpoint.py export-generator --input runs/apt_image --output seaweed_apt_image --dtype bfloat16

Writes are atomic (a killed conversion leaves nothing that looks complete), inputs are never modified,
and only safetensors / JSON are read (nothing is unpickled). Training checkpoints are checked against the
file sizes and checksums recorded when they were saved; given a run folder, a damaged latest checkpoint is
reported (naming the file) and the previous one is used. Names read from a checkpoint must be plain names:
nothing is written outside --output. Bad input (a missing or truncated shard,
mismatched shapes, another preset than --expect-preset, a kind mismatch, an existing output without
--overwrite) exits with status 2 and a message on stderr; a failed --verify exits with status 1 and
writes nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_apt.utils import cli_main


def _summary(model, what: str) -> None:
    n = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    cfg = model.config
    print(f"{what}: {n / 1e6:.2f}M parameters, dtypes {dtypes}, {cfg.num_layers} layers, "
          f"hidden {cfg.hidden_size}, heads {cfg.num_heads}, qk_norm={cfg.qk_norm}")


def _sd3_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = min(8, cfg.pos_embed_max_size) * cfg.patch_size[1]
    x = torch.randn(2, cfg.in_channels, 1, side, side, generator=g)
    t = torch.rand(2, generator=g)
    text = torch.randn(2, 7, cfg.text_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g) if cfg.pooled_dim else None
    return x, t, text, pooled


def verify_against_diffusers(model, diffusers_dir: str, tol: float = 1e-4) -> float:
    """Run our model and diffusers' on the same random inputs (fp32) and return max |difference|."""
    from diffusers import SD3Transformer2DModel

    ref = SD3Transformer2DModel.from_pretrained(diffusers_dir, torch_dtype=torch.float32).eval()
    model = model.float().eval()
    x, t, text, pooled = _sd3_inputs(model.config)
    with torch.no_grad():
        ours = model(x, t, text, pooled=pooled)[:, :, 0]
        theirs = ref(hidden_states=x[:, :, 0], encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=t * 1000.0, return_dict=False)[0]
    err = (ours - theirs).abs().max().item()
    print(f"verify: max |ours - diffusers| = {err:.3e} (tolerance {tol:g})")
    if not err <= tol:
        raise SystemExit(f"verification failed: outputs differ by {err:.3e} > {tol:g}")
    return err


def cmd_import_diffusers(a) -> None:
    from megatron_apt.checkpoint.diffusers_sd3 import import_diffusers
    from megatron_apt.checkpoint.model_dir import load_mmdit

    model = import_diffusers(a.input, a.output, overwrite=a.overwrite)
    _summary(model, f"imported {a.input} -> {a.output}")
    if a.verify:
        verify_against_diffusers(load_mmdit(a.output), a.input)


def cmd_export_diffusers(a) -> None:
    from megatron_apt.checkpoint.diffusers_sd3 import export_diffusers
    from megatron_apt.checkpoint.model_dir import load_mmdit

    model = load_mmdit(a.input)
    export_diffusers(model, a.output, overwrite=a.overwrite)
    _summary(model, f"exported {a.input} -> {a.output}")
    if a.verify:
        verify_against_diffusers(model, a.output)


def cmd_consolidate(a) -> None:
    from megatron_apt.checkpoint.consolidate import consolidate

    rep = consolidate(a.input, a.output, model=a.model, ema=a.ema, dtype=a.dtype, overwrite=a.overwrite,
                      expect_preset=a.expect_preset, verify=a.verify, buffers_from=a.buffers_from, echo=print)
    print(rep.text())


def cmd_reshard(a) -> None:
    from megatron_apt.checkpoint.reshard import reshard

    rep = reshard(a.input, a.output, a.tp, overwrite=a.overwrite, expect_preset=a.expect_preset, verify=a.verify,
                  echo=print)
    print(rep.text())


def _layers(text):
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--head-layers takes comma-separated layer numbers, got {text!r}")


def cmd_make_apt_init(a) -> None:
    from megatron_apt.checkpoint.apt_init import make_apt_init

    rep = make_apt_init(a.diffusion, a.consistency, a.output, head_layers=a.head_layers, seed=a.seed,
                        head_mlp_ratio=a.head_mlp_ratio, overwrite=a.overwrite, expect_preset=a.expect_preset,
                        verify=a.verify, echo=print)
    print(rep.text())


def cmd_export_generator(a) -> None:
    from megatron_apt.checkpoint.apt_init import export_generator

    rep = export_generator(a.input, a.output, ema=a.ema, dtype=a.dtype, overwrite=a.overwrite,
                           expect_preset=a.expect_preset, verify=a.verify, buffers_from=a.buffers_from, echo=print)
    print(rep.text())


def _common(s, verify_help: str) -> None:
    s.add_argument("--output", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    s.add_argument("--verify", action="store_true", help=verify_help)
    s.add_argument("--expect-preset", metavar="NAME", help="refuse a model whose config is not this preset's")


DTYPES = ["float32", "bfloat16", "float16"]
BUFFERS_HELP = ("a model dir (the run's model.init / model.teacher) to copy fixed buffers from (SD3's sin-cos position "
                "table): ZeRO-3 checkpoints hold none, and recomputing it from the config can differ from an "
                "imported table in the last bits")


@cli_main  # an OSError (permission, a missing folder, a full disk): one line naming the path, status 2
def main(argv=None) -> int:
    from megatron_apt.checkpoint.common import DEFAULT_SEED, VerificationError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in [
        ("import-diffusers", cmd_import_diffusers, "diffusers SD3Transformer2DModel dir -> model dir"),
        ("export-diffusers", cmd_export_diffusers, "SD3-configured model dir -> diffusers dir"),
    ]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--input", required=True)
        s.add_argument("--output", required=True)
        s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        s.add_argument("--verify", action="store_true", help="reload and compare outputs with diffusers (fp32)")
        s.set_defaults(fn=fn)

    s = sub.add_parser("consolidate", help="training checkpoint -> model directories")
    s.add_argument("--input", required=True, help="RUN/checkpoints/step-N, or RUN (its latest checkpoint)")
    s.add_argument("--model", help="only this model: G or D (APT), model (flow / cd); output is then its model dir. "
                                   "Default: every model, as sub-directories named like the trainer's export")
    s.add_argument("--ema", action="store_true", help="the model's EMA instead of its raw weights (with --model)")
    s.add_argument("--dtype", choices=DTYPES, help="cast the fp32 master weights (default: keep float32)")
    s.add_argument("--buffers-from", metavar="MODEL_DIR", help=BUFFERS_HELP)
    _common(s, "re-partition the result and compare with every rank file, reload, run a CPU forward")
    s.set_defaults(fn=cmd_consolidate)

    s = sub.add_parser("reshard", help="model dir <-> N tensor-parallel shard files")
    s.add_argument("--input", required=True, help="a model directory, consolidated or sharded")
    s.add_argument("--tp", type=int, required=True, help="tensor-parallel size of the output (1: consolidated)")
    _common(s, "reassemble the shards and compare bit for bit, run a CPU forward")
    s.set_defaults(fn=cmd_reshard)

    s = sub.add_parser("make-apt-init", help="G-hat + diffusion weights -> DIR/generator, DIR/discriminator")
    s.add_argument("--diffusion", required=True, help="the diffusion model dir (the discriminator's backbone)")
    s.add_argument("--consistency", required=True, help="the consistency-distilled G-hat (or a generator) dir")
    s.add_argument("--head-layers", type=_layers, help="1-based discriminator head layers, e.g. 16,26,36 "
                                                       "(default: the paper's 16/36, 26/36, 36/36 of the depth)")
    s.add_argument("--head-mlp-ratio", type=float, default=4.0)
    s.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="training seed: heads are drawn as the APT stage of a run with this seed draws them")
    _common(s, "reload both, compare tensors, run CPU forwards")
    s.set_defaults(fn=cmd_make_apt_init)

    s = sub.add_parser("export-generator", help="the one-step generator -> an inference model dir")
    s.add_argument("--input", required=True, help="RUN, RUN/checkpoints/step-N, or a generator model dir")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--ema", dest="ema", action="store_true", default=True, help="the EMA generator (default)")
    g.add_argument("--raw", dest="ema", action="store_false", help="the raw (non-EMA) generator weights")
    s.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep their dtype)")
    s.add_argument("--buffers-from", metavar="MODEL_DIR", help=BUFFERS_HELP)
    _common(s, "reload as generation code does, compare tensors, run a CPU forward")
    s.set_defaults(fn=cmd_export_generator)

    a = p.parse_args(argv)
    try:
        a.fn(a)
    except VerificationError as e:
        print(f"verification failed: {e} (nothing was written)", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
