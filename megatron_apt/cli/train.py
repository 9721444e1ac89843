"""Entry point for every training stage (flow-matching pretraining, consistency distillation, APT image and
video stages). Thin on purpose: configuration, then the trainer.

    python pretrain_apt.py --config examples/configs/apt_image_8b.yaml optim.lr=5e-6 parallel.tp=2
    torchrun --nproc_per_node 8 pretrain_apt.py --config ...       # or: deepspeed pretrain_apt.py --config ...

Rerunning the same command resumes from the latest checkpoint in run_dir. --dry-run (anywhere among the
arguments) prints the resolved configuration, the parallel layout, the batch arithmetic and the DeepSpeed
config of the engines (with parallel.deepspeed_config=FILE merged over it), then exits.

Exit status: 0 done; 2 bad input (configuration, checkpoint, data, a path that cannot be read or written),
with one `error: ...` line; 3 training stopped because max_bad_steps steps in a row were not finite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_apt.utils import ArgumentParser, cli_main

if not os.environ.get("DS_ACCELERATOR"):
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed picks its accelerator at import
    except ImportError:
        pass


@cli_main  # an OSError (permission, missing folder, full disk): one line naming the path, status 2
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (examples/configs/*.yaml)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, layout, batch plan and DeepSpeed config; exit")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-6 parallel.tp=2")
    a = p.parse_intermixed_args(argv)  # --dry-run before, between or after the overrides
    from megatron_apt.config.train import dump_config, load_config

    try:
        cfg = load_config(a.config, a.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        from megatron_apt.parallel import ParallelDims
        from megatron_apt.trainer.batching import plan_batch

        world = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            dims = ParallelDims.from_world(world, tp=cfg.parallel.tp, sp=cfg.parallel.sp, pp=cfg.parallel.pp)
            plan = plan_batch(cfg.global_batch, dims.dp, cfg.micro_batch)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ds = None
        if cfg.parallel.engine == "deepspeed":
            from megatron_apt.trainer.ds_config import training_ds_config

            try:
                ds = training_ds_config(cfg, dims.dp * dims.sp)
            except (ValueError, FileNotFoundError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        print(dump_config(cfg))
        print(f"# layout: {dims.describe()}")
        print(f"# batch: {plan.describe()}")
        if ds is not None:
            src = f"{cfg.parallel.deepspeed_config} merged over the trainer's" if cfg.parallel.deepspeed_config \
                else "built by the trainer; parallel.deepspeed_config=FILE merges a DeepSpeed JSON over it"
            print(f"# deepspeed config of each engine ({src}), JSON to the end of the output:")
            print(json.dumps(ds, indent=2))
        return 0
    from megatron_apt.trainer.trainer import Trainer, TrainingDiverged

    try:
        Trainer(cfg).train()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
