"""The trainer: one loop for the four stages (flow matching, consistency distillation, APT image/video).

It owns the process groups, the exact-batch plan, the data order, checkpoints (atomic `step-N` folders,
resume by rerunning the same command), telemetry (status line, metrics.jsonl, optional wandb) and the
health guards (non-finite steps skipped, discriminator collapse detected). Stages (methods/stages.py) own
their models, engines and losses.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_apt.config.train import TrainConfig, dump_config
from megatron_apt.parallel import ParallelDims, init_distributed, initialize_model_parallel, parallelize_mmdit
from megatron_apt.trainer.batching import plan_batch
from megatron_apt.trainer.data import IndexedData, StepSampler, SyntheticData, collate
from megatron_apt.trainer.telemetry import Telemetry
from megatron_apt.utils import atomic_write, atomic_write_json, fsync_dir, get_logger, setup_logging

log = get_logger("megatron_apt.trainer")

CKPT_VERSION = 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        init_distributed()
        setup_logging(dist.get_rank(), cfg.log_all_ranks)  # INFO on rank 0, WARNING elsewhere unless asked
        world = dist.get_world_size()
        self.dims = ParallelDims.from_world(world, tp=cfg.parallel.tp, sp=cfg.parallel.sp, pp=cfg.parallel.pp)
        initialize_model_parallel(self.dims)
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.dp_rank = ps.get_data_parallel_rank(with_context_parallel=False)
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
        self.plan = plan_batch(cfg.global_batch, self.dims.dp, cfg.micro_batch)
        from megatron_apt.models.attention import set_attention_backend

        self.attention = set_attention_backend(cfg.model.attention_backend, self.device)
        self.ds_config = None
        if cfg.parallel.engine == "deepspeed":  # a user file's contradictions fail here, before any model is built
            from megatron_apt.trainer.ds_config import training_ds_config

            self.ds_config = training_ds_config(cfg, self.dims.dp * self.dims.sp)
        elif cfg.parallel.deepspeed_config and dist.get_rank() == 0:
            log.warning("parallel.deepspeed_config is not used by parallel.engine=%s", cfg.parallel.engine)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.data = self._build_data()
        self.sampler = StepSampler(self.data, cfg.global_batch, cfg.seed)
        from megatron_apt.methods.stages import STAGE_CLASSES

        torch.manual_seed(cfg.seed)
        if cfg.parallel.engine == "pipeline":
            from megatron_apt.methods.pipeline_stages import PIPELINE_STAGE_CLASSES as STAGE_CLASSES
        self.stage = STAGE_CLASSES[cfg.stage](self)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.telemetry = Telemetry(cfg, self.run_dir, _rank())
        self.low_d_count = 0

    # ---- building -----------------------------------------------------------------------------------
    def _model_config(self):
        from megatron_apt.config.model import get_model_config

        return get_model_config(self.cfg.model.preset, **self.cfg.model.overrides)

    def _build_data(self):
        c = self.cfg
        text_dim = self._model_config().text_dim
        if c.data.synthetic:
            return SyntheticData(c.data.synthetic_shape, c.data.synthetic_text_len, text_dim, c.data.synthetic_size,
                                 c.seed)
        from megatron_apt.data.indexed import is_complete

        for prefix in str(c.data.path).split(","):
            if not is_complete(prefix.strip()):
                raise FileNotFoundError(f"dataset {prefix} does not exist or is incomplete (no manifest "
                                        f"{prefix}.json): run tools/preprocess_video.py first")
        data = IndexedData(c.data.path, text_dim, c.data.max_text_len, c.data.latent_scale, c.seed)
        if c.data.preload:
            t0 = time.perf_counter()
            data.preload(self.device)
            log.info("held %d samples on %s (%.1f s)", len(data), self.device, time.perf_counter() - t0)
        return data

    def load_or_build_backbone(self, path: str | None, parallel: bool = True):
        from megatron_apt.models import build_mmdit, load_mmdit

        if path:
            model = load_mmdit(path)
            want = self._model_config()
            if model.config.to_dict() != want.to_dict():
                log.info("using the shape stored in %s (the configured preset %s differs)", path, self.cfg.model.preset)
        else:
            model = build_mmdit(self._model_config(), seed=self.cfg.seed)
        model = model.to(self.device)
        if parallel:
            self.parallelize(model)
        return model

    def parallelize(self, module, extra_blocks=()):
        return parallelize_mmdit(module, self.dims, activation_checkpointing=self.cfg.parallel.activation_checkpointing,
                                 compile=self.cfg.parallel.compile, extra_blocks=extra_blocks)

    def make_engine(self, module, lr: float):
        from megatron_apt.trainer.engines import build_engine

        o, p = self.cfg.optim, self.cfg.parallel
        eng = build_engine(module.to(self.device), kind=p.engine, optimizer=o.optimizer, lr=lr, alpha=o.alpha,
                            eps=o.eps, weight_decay=o.weight_decay, betas=o.betas, grad_clip=o.grad_clip,
                            precision=self.cfg.precision, zero_stage=p.zero_stage, micro_batch=self.cfg.micro_batch,
                            persistence_threshold=p.zero_persistence_threshold, zero1=p.zero1,
                            deepspeed_config=p.deepspeed_config)
        eng.base_lr = lr
        return eng

    # ---- collectives ----------------------------------------------------------------------------------
    def global_mean(self, total: float, count: float) -> float:
        """Mean over the global batch of per-sample values summed on each data-parallel rank."""
        t = torch.tensor([total, count], dtype=torch.float64)
        if self.dims.dp > 1:
            g = self.ps.get_data_parallel_group(with_context_parallel=False)
            if dist.get_backend(g) == "nccl":
                t = t.to(self.device)
            dist.all_reduce(t, group=g)
        return float(t[0] / max(t[1], 1e-12))

    # ---- data ---------------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        idx = self.sampler.indices(step)
        out = []
        for a, b in self.plan.micro_batches(self.dp_rank):
            weight = 1.0
            if a == b:  # this rank has no sample left: a weight-0 step keeps ZeRO-3 collectives aligned
                a, b, weight = self.plan.rank_slice(self.dp_rank)[0], self.plan.rank_slice(self.dp_rank)[0] + 1, 0.0
            if getattr(self.data, "held", None) is not None:
                mb = self.data.batch([idx[p] for p in range(a, b)])
            else:
                mb = collate([self.data.get(idx[p]) for p in range(a, b)], self.device)
            if self.cfg.precision == "bf16" and self.cfg.parallel.engine == "deepspeed":
                mb["x"], mb["text"] = mb["x"].to(torch.bfloat16), mb["text"].to(torch.bfloat16)
            mb["positions"] = list(range(a, b))
            mb["weight"] = weight
            out.append(mb)
        return out

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        shapes = {}
        for name, eng in self.stage.engines().items():
            # ZeRO-3 leaves placeholders in p.shape; ds_shape is the real (tensor-parallel local) shape
            shapes[name] = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in eng.module.named_parameters()}
        return {"stage": self.cfg.stage, "layout": [self.dims.tp, self.dims.sp, self.dims.dp, self.dims.pp],
                "engine": self.cfg.parallel.engine, "zero_stage": self.cfg.parallel.zero_stage,
                "precision": self.cfg.precision, "shapes": shapes}

    def latest_checkpoint(self) -> Path | None:
        if not self.ckpt_dir.is_dir():
            return None
        done = sorted(p for p in self.ckpt_dir.glob("step-*") if (p / "trainer.json").is_file() and not p.name.endswith("partial"))
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        name = f"step-{self.step:08d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".{name}.partial"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        tensors = {}
        for ename, eng in self.stage.engines().items():
            for k, v in eng.state_tensors().items():
                tensors[f"{ename}.{k}"] = v.detach().cpu().contiguous()
            if eng.kind == "deepspeed":  # ZeRO-3 state holds no buffers (e.g. SD3's sin-cos table)
                for k, b in eng.module.named_buffers():
                    tensors[f"{ename}.buffer.{k}"] = b.detach().cpu().contiguous()
        # the folder is renamed into place only when every rank has written: no partial step-N is ever visible
        save_file(tensors, str(tmp / f"rank{_rank():05d}.safetensors"))
        layout = {"rank": _rank(), "tp_rank": self.ps.get_tensor_model_parallel_rank(),
                  "pp_rank": self.ps.get_pipeline_model_parallel_rank(),
                  "zero_rank": self.ps.get_data_parallel_rank(with_context_parallel=True),
                  "engines": {n: e.layout() for n, e in self.stage.engines().items()}}
        atomic_write_json(tmp / f"rank{_rank():05d}.json", layout)
        _barrier()
        if _rank() == 0:
            models = {}
            for n, e in self.stage.engines().items():
                mod = e.module.backbone if hasattr(e.module, "backbone") else e.module
                models[n] = {"model": mod.config.to_dict(),
                             "head_layers": list(getattr(e.module, "head_layers", [])) or None,
                             "kind": {"G": "generator", "D": "discriminator"}.get(
                                 n, "consistency" if self.cfg.stage == "cd" else "diffusion")}
            atomic_write_json(tmp / "trainer.json", {"version": CKPT_VERSION, "step": self.step,
                                                      "models": models, "tp": self.dims.tp, "sp": self.dims.sp,
                                                      "world_size": dist.get_world_size(),
                                                      "fingerprint": self._fingerprint(),
                                                      "history_tail": self.history[-5:],
                                                      "low_d_count": self.low_d_count})
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.ckpt_dir)
            kept = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir())
            for old in kept[: -max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("saved checkpoint %s", final)
        _barrier()
        return final

    def load_checkpoint(self, path: Path) -> None:
        meta = json.loads((path / "trainer.json").read_text())
        fp = self._fingerprint()
        old = meta.get("fingerprint", {})
        if self.dims.pp > 1:  # pipeline stages hold different parameters: compare with this rank's own record
            mine = path / f"rank{_rank():05d}.json"
            lay = json.loads(mine.read_text())["engines"] if mine.is_file() else {}
            old = {**old, "shapes": {n: {q[0]: q[1] for q in e.get("params", [])} for n, e in lay.items()}}
        if old.get("layout") != fp["layout"] or meta.get("world_size") != dist.get_world_size():
            raise ValueError(f"checkpoint {path} was written with layout tp,sp,dp,pp={old.get('layout')} on "
                             f"{meta.get('world_size')} ranks; this run has {fp['layout']} on {dist.get_world_size()}. "
                             "Resume needs the same layout (consolidate and start a new run to change it).")
        if old.get("shapes") != fp["shapes"]:
            raise ValueError(f"checkpoint {path} was written by a model of another shape or kind; refusing to resume "
                             f"(use another run_dir, or the checkpoint tools to convert it)")
        f = path / f"rank{_rank():05d}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no shard for rank {_rank()} ({f.name})")
        tensors = load_file(str(f), device=str(self.device))
        for ename, eng in self.stage.engines().items():
            pre = f"{ename}."
            eng.load_state_tensors({k[len(pre):]: v for k, v in tensors.items()
                                    if k.startswith(pre) and not k.startswith(pre + "buffer.")})
        self.step = int(meta["step"])
        self.low_d_count = int(meta.get("low_d_count", 0))
        log.info("resumed from %s (step %d)", path, self.step)

    # ---- telemetry ------------------------------------------------------------------------------------------
    def _log(self, rec: dict[str, Any]) -> None:
        if _rank() != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.telemetry.record(rec)  # status line, progress bar, wandb

    # ---- the loop ---------------------------------------------------------------------------------------------
    def describe(self) -> str:
        c = self.cfg
        if c.parallel.engine == "pipeline":
            eng = (f"engine pipeline ({self.dims.pp} stage(s), megatron-core 1F1B schedule, optimizer state "
                   f"{'sharded over dp (ZeRO-1)' if c.parallel.zero1 and self.dims.dp > 1 else 'whole'})")
        else:
            eng = f"engine {c.parallel.engine} (ZeRO-{c.parallel.zero_stage})"
            if c.parallel.deepspeed_config:
                from megatron_apt.trainer.ds_config import built_for, changed_keys

                eng += (f"; DeepSpeed config {c.parallel.deepspeed_config} merged over the trainer's: "
                        + (", ".join(changed_keys(built_for(c), self.ds_config)) or "no change"))
        attn = c.model.attention_backend + (f" -> {self.attention}" if c.model.attention_backend == "auto" else "")
        lines = [f"stage {c.stage}, {self.dims.describe()}, {eng}, precision {c.precision}, attention {attn}",
                 self.plan.describe(),
                 f"dataset: {len(self.data)} samples, {len(self.sampler.buckets)} shape bucket(s)"]
        return "\n".join(lines)

    def train(self) -> list[dict[str, Any]]:
        c = self.cfg
        if _rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.run_dir / "config.yaml", "w") as f:
                f.write(dump_config(c))
        latest = self.latest_checkpoint()
        if latest is not None:
            self.load_checkpoint(latest)
        if _rank() == 0:
            log.info("%s", self.describe())
        self.telemetry.start(self.step)
        x_shape = None
        from megatron_apt.metrics.flops import peak_flops

        peak = peak_flops(self.device) or float("nan")  # datasheet bf16 dense; unknown (CPU) -> MFU not shown
        while self.step < c.steps:
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            if c.optim.warmup_steps > 0 or c.optim.schedule != "constant":
                for eng in self.stage.engines().values():
                    eng.set_lr(self.lr_at(eng.base_lr))
            mbs = self.micro_batches(self.step)
            x_shape = tuple(mbs[0]["x"].shape[1:])
            text_len = mbs[0]["text"].shape[1]
            metrics = self.stage.train_step(self.step, mbs)
            self.step += 1
            dt = time.perf_counter() - t0
            finite = all(math.isfinite(v) for k, v in metrics.items() if k.endswith("loss"))
            flops = self.stage.model_flops(x_shape, text_len) * c.global_batch
            world = dist.get_world_size()
            rec = {"step": self.step, **{k: float(v) for k, v in metrics.items()}, "step_time_s": dt,
                   "samples_per_s": c.global_batch / dt, "tflops": flops / dt / 1e12 / world if math.isfinite(flops) else float("nan"),
                   "mfu": (flops / dt / world / peak) if math.isfinite(flops) else float("nan"),
                   "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else _rss_gb(),
                   "finite": finite}
            self.history.append(rec)
            self.telemetry.step()
            if self.step % c.log_every == 0 or self.step == c.steps:
                self._log(rec)
            self._health(rec)
            if c.sample_every and self.step % c.sample_every == 0:
                self.write_samples()
            if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                self.save_checkpoint()
        if self.latest_checkpoint() is None or self.latest_checkpoint().name != f"step-{self.step:08d}":
            self.save_checkpoint()
        self.export()
        self.telemetry.finish()  # closes the bar, writes run_dir/plots, ends the wandb run
        return self.history

    def lr_at(self, base: float) -> float:
        """The learning rate of update `self.step + 1`: linear warmup, then constant or cosine to min_lr."""
        o, n = self.cfg.optim, self.step + 1
        if o.warmup_steps > 0 and n <= o.warmup_steps:
            return base * n / o.warmup_steps
        if o.schedule == "cosine":
            span = max(1, self.cfg.steps - o.warmup_steps)
            frac = min(1.0, max(0.0, (n - o.warmup_steps) / span))
            return o.min_lr + (base - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
        return base

    def _health(self, rec: dict[str, Any]) -> None:
        if not rec["finite"]:
            log.warning("step %d: non-finite loss %s; the optimizer step was skipped where the engine allows",
                        rec["step"], {k: v for k, v in rec.items() if k.endswith("loss")})
        if "d_adv" in rec:
            if rec["d_adv"] < self.cfg.apt.collapse_d_loss:
                self.low_d_count += 1
            else:
                self.low_d_count = 0
            if self.low_d_count == self.cfg.apt.collapse_patience:
                msg = (f"DISCRIMINATOR COLLAPSE: D's adversarial loss stayed below {self.cfg.apt.collapse_d_loss} for "
                       f"{self.low_d_count} steps (logit gap {rec.get('logit_gap', float('nan')):.2f}); the generator is "
                       "likely producing flat colours (paper Fig. 5). Check apt.use_r1 / r1_lambda.")
                log.warning(msg)
                rec["collapse_warning"] = True
                if self.cfg.apt.rollback_on_collapse:
                    last = self.latest_checkpoint()
                    if last is not None:
                        log.warning("rolling back to %s", last)
                        self.load_checkpoint(last)
                        self.low_d_count = 0

    # ---- outputs ------------------------------------------------------------------------------------------------
    def _full_state(self, eng, use_ema: bool) -> dict[str, torch.Tensor]:
        from megatron_apt.parallel.tp_consolidate import consolidate_tp

        with eng.full_parameters(use_ema=use_ema) as sd:
            sd = {k: v.detach().float().cpu() for k, v in sd.items()}
        return consolidate_tp(eng.module, sd)

    def export(self) -> None:
        """Consolidated safetensors model directories of the stage's products under run_dir/export."""
        from megatron_apt.models.io import save_state_dir

        out = self.run_dir / "export"
        engines = self.stage.engines()
        if self.dims.pp > 1:
            self._export_from_checkpoint(out)
            return
        if "G" in engines:
            g = engines["G"]
            for tag, ema in (("generator", False), ("generator_ema", True)):
                sd = self._full_state(g, ema)
                sd = {k[len("backbone."):]: v for k, v in sd.items()}
                if _rank() == 0:
                    save_state_dir(sd, g.module.config, out / tag, kind="generator", overwrite=True)
            d = engines["D"]
            sd = self._full_state(d, False)
            if _rank() == 0:
                save_state_dir(sd, d.module.backbone.config, out / "discriminator", kind="discriminator",
                               overwrite=True, extra={"head_layers": list(d.module.head_layers)})
        else:
            m = engines["model"]
            kind = "diffusion" if self.cfg.stage == "flow" else "consistency"
            extra = {"training": self.training_record()}
            sd = self._full_state(m, False)
            if _rank() == 0:
                save_state_dir(sd, m.module.config, out / "model", kind=kind, overwrite=True, extra=extra)
            if m.ema is not None:
                sd = self._full_state(m, True)
                if _rank() == 0:
                    save_state_dir(sd, m.module.config, out / "model_ema", kind=kind, overwrite=True, extra=extra)
        _barrier()
        if _rank() == 0:
            log.info("exported consolidated models to %s", out)

    def training_record(self) -> dict[str, Any]:
        """What a sampler needs to know of how the exported model was trained (recorded in its config.json):
        the flow-matching timestep shift (None = resolution dependent, SD3's sqrt(tokens / 256))."""
        c = self.cfg
        rec: dict[str, Any] = {"stage": c.stage, "steps": self.step}
        if c.stage == "flow":
            rec["shift"] = c.flow.shift
        elif c.stage == "cd":
            rec["shift"] = c.cd.shift
        return rec

    def _export_from_checkpoint(self, out: Path) -> None:
        """Pipeline stages hold disjoint parameters: rank 0 consolidates the final checkpoint offline (the
        code of `tools/convert_checkpoint.py consolidate`)."""
        from megatron_apt.checkpoint.convert import consolidate

        _barrier()
        if _rank() == 0:
            consolidate(self.latest_checkpoint(), out, overwrite=True)
            log.info("exported consolidated models to %s", out)
        _barrier()

    @torch.no_grad()
    def write_samples(self) -> None:
        """A one-step sample grid (pixel-space models: the pixels; latent models: the first 3 channels)."""
        from megatron_apt.inference.grid import save_grid

        mbs = self.micro_batches(0)
        mb = mbs[0]
        z = torch.randn(mb["x"].shape, generator=torch.Generator().manual_seed(self.cfg.seed)).to(mb["x"])
        eng = self.stage.engines().get("G")
        if hasattr(self.stage, "sample"):  # pipeline: the last stage holds the samples
            x = self.stage.sample(z, mb["text"], mb["text_mask"])
            if x is not None and self.dp_rank == 0 and self.ps.get_tensor_model_parallel_rank() == 0:
                save_grid(x.float().cpu(), self.run_dir / "samples" / f"step-{self.step:08d}.png")
            return  # written by the last stage, not rank 0: not sent to wandb
        if eng is not None:
            x = eng(z, mb["text"], mb["text_mask"])
        else:
            m = self.stage.engines()["model"]
            t = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
            x = z - m(z, t, mb["text"], mb["text_mask"])
        if _rank() == 0:
            grid = save_grid(x.float().cpu(), self.run_dir / "samples" / f"step-{self.step:08d}.png")
            clip = None
            if x.shape[2] > 1 and self.telemetry.wandb is not None:  # a video model: its first sample as a clip
                from megatron_apt.inference.video import write_mp4

                clip = write_mp4(x[0].float().cpu(), grid.with_suffix(".mp4"), fps=4)
            self.telemetry.samples(grid, self.step, clip)


def _rss_gb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:
        return float("nan")
