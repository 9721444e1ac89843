"""The trainer: one loop for the four stages (flow matching, consistency distillation, APT image/video).

It owns the process groups, the exact-batch plan, the data order, checkpoints (atomic `step-N` folders with
recorded checksums, verified on resume with a fall back to the previous one; resume by rerunning the same
command), telemetry (status line, metrics.jsonl in strict JSON, optional wandb) and the health guards
(non-finite steps skipped and counted, the run stopped after `max_bad_steps` in a row; discriminator collapse
detected). Methods (megatron_apt.methods) own their models, engines and losses.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_apt.checkpoint.training import CheckpointStore
from megatron_apt.config.train import TrainConfig, dump_config
from megatron_apt.parallel import ParallelDims, init_distributed, initialize_model_parallel, parallelize_mmdit
from megatron_apt.parallel.comm import all_ranks_true
from megatron_apt.trainer.batching import plan_batch
from megatron_apt.data.loader import IndexedData, StepSampler, SyntheticData, collate
from megatron_apt.trainer.telemetry import Telemetry
from megatron_apt.utils import NotEnoughSpaceError, atomic_write, get_logger, json_safe, setup_logging, strict_dumps

log = get_logger("megatron_apt.trainer")

class TrainingDiverged(RuntimeError):
    """The run stopped: too many non-finite steps in a row, or weights that are no longer finite."""


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
        self.checkpoints = CheckpointStore(self.ckpt_dir, self.device, cfg.keep_checkpoints, async_save=cfg.async_save)
        self.data = self._build_data()
        self.sampler = StepSampler(self.data, cfg.global_batch, cfg.seed)
        from megatron_apt.methods import METHODS, MethodContext
        from megatron_apt.parallel.execution import LocalExecutor, PipelineExecutor

        self.check_model_kinds()
        torch.manual_seed(cfg.seed)
        if cfg.parallel.engine == "pipeline":
            dt = torch.bfloat16 if (cfg.precision == "bf16" and self.device.type == "cuda") else None
            executor = PipelineExecutor(self.device, autocast_dtype=dt)
        else:
            executor = LocalExecutor()
        self.method = METHODS[cfg.stage](MethodContext(
            cfg=cfg, device=self.device, executor=executor, build=self.build_model, engine=self.make_engine,
            loss_scale=self.plan.loss_scale(), global_mean=self.global_mean, encode_prompt=self.encode_prompt))
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.telemetry = Telemetry(cfg, self.run_dir, _rank())
        self.low_d_count = 0
        self.bad_in_row = 0  # consecutive steps whose update was skipped (non-finite loss or gradient norm)
        self.bad_total = 0

    # ---- building -----------------------------------------------------------------------------------
    def _model_config(self):
        from megatron_apt.config.model import get_model_config

        return get_model_config(self.cfg.model.preset, **self.cfg.model.overrides)

    def _build_data(self):
        c = self.cfg
        text_dim = self._model_config().text_dim
        if c.data.synthetic:
            return SyntheticData(c.data.synthetic_shape, c.data.synthetic_text_len, text_dim, c.data.synthetic_size,
                                 c.seed, fixed_text_len=c.data.synthetic_fixed_text_len)
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

    # What each stage starts from (§3.2-3.5): kind recorded in each model directory's config.json.
    EXPECTED_KINDS = {
        "flow": {"init": ("diffusion",)},
        "cd": {"init": ("diffusion", "consistency"), "teacher": ("diffusion",)},
        "apt_image": {"init": ("consistency", "generator"), "teacher": ("diffusion",)},
        "apt_video": {"init": ("generator", "consistency"), "teacher": ("diffusion",)},
    }
    ROLES = {"flow": {"init": "the diffusion model to continue from"},
             "cd": {"init": "the student's start (the diffusion model)", "teacher": "the frozen diffusion teacher"},
             "apt_image": {"init": "G's start (the consistency-distilled G-hat, §3.2)",
                           "teacher": "D's backbone (the original diffusion weights, §3.3)"},
             "apt_video": {"init": "G's start (the image stage's EMA generator, §3.5)",
                           "teacher": "D's backbone (the original diffusion weights, §3.5)"}}

    def check_model_kinds(self) -> None:
        """Refuse, in one line, a model directory of the wrong kind for its role (a generator given as the
        teacher, a diffusion model as APT's G-hat, ...)."""
        from megatron_apt.checkpoint.model_dir import read_model_dir

        c = self.cfg
        for role, allowed in self.EXPECTED_KINDS[c.stage].items():
            path = getattr(c.model, role)
            if not path:
                continue
            kind = read_model_dir(path)[0].get("kind")
            if kind not in allowed:
                raise ValueError(f"model.{role}={path} holds a {kind!r} model; stage {c.stage} needs "
                                 f"{self.ROLES[c.stage][role]}: kind {' or '.join(allowed)}")

    def encode_prompt(self, prompt: str):
        """A fixed prompt (CD's negative prompt, §3.2) encoded as the data set's captions were: ([1, L, D] text
        features, [1, L] mask) on the training device, or None for the empty prompt (the null text)."""
        if not prompt:
            return None
        from megatron_apt.models.text_encoder import ByteTokenizer, TokenEmbedder, load_text_encoder, load_tokenizer

        c, text_dim = self.cfg, self._model_config().text_dim
        kind, tok = "ids", {"name": "byte"}
        if not c.data.synthetic:
            from megatron_apt.data.dataset import LatentVideoDataset

            first = LatentVideoDataset(str(c.data.path).split(",")[0].strip())
            kind = first.text_kind
            tok = (first.manifest.get("settings") or {}).get("tokenizer") or {"name": "byte"}
        if kind == "hidden" or tok.get("name") != "byte":
            if not c.cd.text_encoder:
                raise ValueError(f"cd.negative_prompt needs cd.text_encoder: the data set's captions were encoded "
                                 f"by a {'text encoder' if kind == 'hidden' else 'tokenizer'} this run must encode "
                                 "the negative prompt with too")
        if kind == "hidden":
            enc = load_text_encoder(c.cd.text_encoder, device=self.device)
            if enc.dim != text_dim:
                raise ValueError(f"cd.text_encoder {c.cd.text_encoder} has width {enc.dim}, the model's text_dim is "
                                 f"{text_dim}")
            feats, mask = enc.encode([prompt], max_length=c.data.max_text_len)
            del enc
        else:
            tokenizer = ByteTokenizer() if tok.get("name") == "byte" else load_tokenizer(c.cd.text_encoder)
            ids, mask = tokenizer([prompt], max_length=c.data.max_text_len)
            feats = TokenEmbedder(text_dim)(ids)
        log.info("negative prompt %r: %d tokens", prompt, int(mask.sum()))
        return feats.float().to(self.device), mask.to(self.device)

    def load_or_build_backbone(self, path: str | None, parallel: bool = True):
        from megatron_apt.models import build_mmdit
        from megatron_apt.checkpoint.model_dir import load_mmdit

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

    def build_model(self, kind: str, path: str | None, *, dcfg=None, head_seed: int | None = None):
        """The model a method trains or reads, for this rank's layout: "velocity" (an MMDiT; path None = a
        fresh one from the seed), "generator" (Eq. 5 around a G-hat directory) or "discriminator" (the
        directory's weights plus heads drawn from head_seed, §3.3); whole and parallelised, or this rank's
        pipeline stage of it (read stage-only from the directory)."""
        from megatron_apt.models.discriminator import Discriminator, OneStepGenerator

        if self.cfg.parallel.engine == "pipeline":
            from megatron_apt.checkpoint.model_dir import load_pipeline_stage
            from megatron_apt.parallel.pipeline import make_pipeline_stage

            pp_rank, pp = self.ps.get_pipeline_model_parallel_rank(), self.dims.pp
            layers = None if kind == "discriminator" else self.cfg.parallel.pipeline_layers
            if path is None:  # from scratch: the whole model is initialised (same weights on any layout), then cut
                return make_pipeline_stage(self.load_or_build_backbone(None), pp_rank, pp, layers)
            st = load_pipeline_stage(kind, path, pp_rank, pp, layers_per_stage=layers, discriminator_config=dcfg,
                                     head_seed=head_seed, device=self.device)
            self.parallelize(st, extra_blocks=list(st.heads.values()) if kind == "discriminator" else ())
            return st
        if kind == "velocity":
            return self.load_or_build_backbone(path)
        if kind == "generator":
            return self.parallelize(OneStepGenerator(self.load_or_build_backbone(path, parallel=False)))
        D = Discriminator(self.load_or_build_backbone(path, parallel=False), dcfg)
        D.init_heads(generator=torch.Generator().manual_seed(head_seed))
        return self.parallelize(D, extra_blocks=list(D.heads))

    def parallelize(self, module, extra_blocks=()):
        par = self.cfg.parallel
        return parallelize_mmdit(module, self.dims, activation_checkpointing=par.recompute, compile=par.compile,
                                 extra_blocks=extra_blocks)

    def make_engine(self, module, lr: float):
        from megatron_apt.models.discriminator import Discriminator
        from megatron_apt.trainer.engines import build_engine

        o, p = self.cfg.optim, self.cfg.parallel
        eng = build_engine(module.to(self.device), kind=p.engine, optimizer=o.optimizer, lr=lr, alpha=o.alpha,
                            eps=o.eps, weight_decay=o.weight_decay, betas=o.betas, grad_clip=o.grad_clip,
                            precision=self.cfg.precision, zero_stage=p.zero_stage, micro_batch=self.cfg.micro_batch,
                            persistence_threshold=p.zero_persistence_threshold, zero1=p.zero1,
                            deepspeed_config=p.deepspeed_config,
                            leaf_blocks=p.zero3_leaf_blocks and not isinstance(module, Discriminator),
                            deepspeed_bf16=p.deepspeed_bf16)
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
            if self.cfg.precision == "bf16" and self.cfg.parallel.engine == "deepspeed" and \
                    self.cfg.parallel.deepspeed_bf16 == "params":  # bf16 parameters take bf16 inputs
                mb["x"], mb["text"] = mb["x"].to(torch.bfloat16), mb["text"].to(torch.bfloat16)
            mb["positions"] = list(range(a, b))
            mb["weight"] = weight
            out.append(mb)
        return out

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        shapes = {}
        for name, eng in self.method.engines().items():
            # ZeRO-3 leaves placeholders in p.shape; ds_shape is the real (tensor-parallel local) shape
            shapes[name] = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in eng.module.named_parameters()}
        return {"stage": self.cfg.stage, "layout": [self.dims.tp, self.dims.sp, self.dims.dp, self.dims.pp],
                "engine": self.cfg.parallel.engine, "zero_stage": self.cfg.parallel.zero_stage,
                "precision": self.cfg.precision, "shapes": shapes}

    def latest_checkpoint(self) -> Path | None:
        self.checkpoints.wait()  # a checkpoint still being written in the background counts once it is complete
        return self.checkpoints.latest()

    def _ensure_finite_weights(self, what: str) -> None:
        """Refuse to write weights that are not finite (on any rank)."""
        ok = all(e.weights_finite() for e in self.method.engines().values())
        if not all_ranks_true(ok, self.device):
            last = self.latest_checkpoint()
            raise TrainingDiverged(
                f"the weights are not finite at step {self.step}; not writing the {what}. The last checkpoint is "
                f"{last if last else 'none'}; lower optim.lr (now {self.cfg.optim.lr:g}) or check the data, then "
                "rerun (it resumes from that checkpoint)")

    def save_checkpoint(self) -> Path:
        self._ensure_finite_weights("checkpoint")
        engines = self.method.engines()
        models = {}
        for n, e in engines.items():
            mod = e.module.backbone if hasattr(e.module, "backbone") else e.module
            models[n] = {"model": mod.config.to_dict(), "head_layers": list(getattr(e.module, "head_layers", [])) or None,
                         "kind": {"G": "generator", "D": "discriminator"}.get(
                             n, "consistency" if self.cfg.stage == "cd" else "diffusion")}
        rank_layout = {"tp_rank": self.ps.get_tensor_model_parallel_rank(),
                       "pp_rank": self.ps.get_pipeline_model_parallel_rank(),
                       "zero_rank": self.ps.get_data_parallel_rank(with_context_parallel=True)}
        meta = {"models": models, "tp": self.dims.tp, "sp": self.dims.sp, "fingerprint": self._fingerprint(),
                "history_tail": [json_safe(h) for h in self.history[-5:]], "low_d_count": self.low_d_count,
                "bad_steps": [self.bad_in_row, self.bad_total]}
        return self.checkpoints.save(self.step, engines, rank_layout, meta)

    def resume(self) -> Path | None:
        """Load the newest intact checkpoint (see `CheckpointStore.resume`)."""
        return self.checkpoints.resume(self.load_checkpoint)

    def load_checkpoint(self, path: Path) -> None:
        meta = self.checkpoints.load(path, self.method.engines(), self._fingerprint(), pipeline=self.dims.pp > 1)
        self.step = int(meta["step"])
        self.low_d_count = int(meta.get("low_d_count", 0))
        self.bad_in_row, self.bad_total = (int(v) for v in meta.get("bad_steps", [0, 0]))
        log.info("resumed from %s (step %d)", path, self.step)

    # ---- telemetry ------------------------------------------------------------------------------------------
    def _log(self, rec: dict[str, Any]) -> None:
        if _rank() != 0:
            return
        safe = json_safe(rec)  # strict JSON: a non-finite value is null, its key listed under "nonfinite"
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(strict_dumps(safe) + "\n")
        self.telemetry.record(rec)  # status line, progress bar, wandb

    def _truncate_metrics(self) -> None:
        """On (re)start, drop the records of steps after the one restored (a killed run logged them, and they
        are about to be run again), and rewrite old records as strict JSON: each step appears once."""
        f = self.run_dir / "metrics.jsonl"
        if _rank() != 0 or not f.is_file():
            return
        keep, changed = [], False
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)  # also reads the bare NaN older versions wrote
            except ValueError:
                changed = True  # a line cut by a kill
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or rec["step"] > self.step:
                changed = True
                continue
            out = strict_dumps(json_safe(rec))
            changed |= out != line
            keep.append(out)
        if changed:
            with atomic_write(f, "w") as w:
                w.write("".join(k + "\n" for k in keep))

    # ---- the loop ---------------------------------------------------------------------------------------------
    def describe(self) -> str:
        c = self.cfg
        if c.parallel.engine == "pipeline":
            eng = (f"engine pipeline ({self.dims.pp} stage(s), megatron-core 1F1B schedule, optimizer state "
                   f"{'sharded over dp (ZeRO-1)' if c.parallel.zero1 and self.dims.dp > 1 else 'whole'})")
        elif c.parallel.engine == "torch":
            eng = "engine torch (gradients averaged over dp x sp, optimizer state whole)"
        else:
            bf16 = f", bf16 {c.parallel.deepspeed_bf16}" if c.precision == "bf16" else ""
            eng = f"engine deepspeed (ZeRO-{c.parallel.zero_stage}{bf16})"
            if c.parallel.deepspeed_config:
                from megatron_apt.trainer.ds_config import built_for, changed_keys

                eng += (f"; DeepSpeed config {c.parallel.deepspeed_config} merged over the trainer's: "
                        + (", ".join(changed_keys(built_for(c), self.ds_config)) or "no change"))
        attn = c.model.attention_backend + (f" -> {self.attention}" if c.model.attention_backend == "auto" else "")
        lines = [f"stage {c.stage}, {self.dims.describe()}, {eng}, precision {c.precision}, attention {attn}",
                 self.plan.describe(),
                 f"dataset: {len(self.data)} samples, {len(self.sampler.buckets)} shape bucket(s)"]
        return "\n".join(lines)

    def _prepare_run_dir(self) -> None:
        """Rank 0 creates the run folder, writes the resolved config and removes what a killed run left
        (interrupted checkpoint and export folders). Every rank learns whether that worked: an unwritable
        run_dir stops all ranks with the OSError, not only rank 0."""
        err: OSError | None = None
        if _rank() == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                with atomic_write(self.run_dir / "config.yaml", "w") as f:
                    f.write(dump_config(self.cfg))
                for stale in [*self.ckpt_dir.glob(".step-*.partial"), *(self.run_dir / "export").glob(".*.partial"),
                              *(self.run_dir / "export").glob(".*.old-*")]:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError as e:
                err = e
        if not all_ranks_true(err is None, self.device):
            raise err if err is not None else OSError(f"rank 0 could not prepare the run folder {self.run_dir}")

    def train(self) -> list[dict[str, Any]]:
        c = self.cfg
        self._prepare_run_dir()
        self.resume()
        self._truncate_metrics()
        if _rank() == 0:
            log.info("%s", self.describe())
        self.telemetry.start(self.step)
        x_shape = None
        from megatron_apt.models.flops import peak_flops

        peak = peak_flops(self.device) or float("nan")  # datasheet bf16 dense; unknown (CPU) -> MFU not shown
        while self.step < c.steps:
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            if c.optim.warmup_steps > 0 or c.optim.schedule != "constant":
                for eng in self.method.engines().values():
                    eng.set_lr(self.lr_at(eng.base_lr))
            mbs = self.micro_batches(self.step)
            x_shape = tuple(mbs[0]["x"].shape[1:])
            text_len = mbs[0]["text"].shape[1]
            metrics = self.method.train_step(self.step, mbs)
            self.step += 1
            dt = time.perf_counter() - t0
            finite = all(math.isfinite(v) for k, v in metrics.items() if k.endswith("loss"))
            # an engine skips an update whose gradient norm is not finite (a non-finite loss gives one)
            skipped = [n for n, e in self.method.engines().items() if getattr(e, "skipped", False)]
            # every rank takes the same decision (the engines already agree; the losses are global means)
            bad = not all_ranks_true(finite and not skipped, self.device)
            flops = self.method.model_flops(x_shape, text_len) * c.global_batch
            world = dist.get_world_size()
            known = math.isfinite(flops) and math.isfinite(peak)  # CPU: no datasheet peak, MFU unknown
            rec = {"step": self.step, **{k: float(v) for k, v in metrics.items()}, "step_time_s": dt,
                   "samples_per_s": c.global_batch / dt,
                   "tflops": flops / dt / 1e12 / world if math.isfinite(flops) else None,
                   "mfu": (flops / dt / world / peak) if known else None,
                   "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else _rss_gb(),
                   "finite": finite, "skipped_update": bad}
            self.history.append(rec)
            self.telemetry.step()
            if self.step % c.log_every == 0 or self.step == c.steps or bad:
                self._log(rec)
            self._health(rec)
            if c.sample_every and self.step % c.sample_every == 0:
                self.write_samples()
            if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                self.save_checkpoint()
        if c.save_final:
            if self.latest_checkpoint() is None or self.latest_checkpoint().name != f"step-{self.step:08d}":
                self.save_checkpoint()
            self.checkpoints.wait()
            self.export()
        self.checkpoints.wait()
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
        if rec["skipped_update"]:
            self.bad_in_row += 1
            self.bad_total += 1
            vals = {k: v for k, v in rec.items() if k.endswith("loss") or k.endswith("grad_norm")}
            if _rank() == 0:
                log.warning("step %d: non-finite loss or gradient norm %s: the update was skipped on every rank (%d in "
                            "a row, %d in this run; the run stops at %d in a row)", rec["step"], vals,
                            self.bad_in_row, self.bad_total, self.cfg.max_bad_steps)
            if self.bad_in_row >= self.cfg.max_bad_steps:
                last = self.latest_checkpoint()
                raise TrainingDiverged(
                    f"stopped at step {rec['step']}: {self.bad_in_row} steps in a row had a non-finite loss or gradient "
                    f"norm (max_bad_steps={self.cfg.max_bad_steps}); their updates were skipped, and the run stops "
                    f"without saving or exporting. The last checkpoint is {last if last else 'none'}; lower optim.lr (now "
                    f"{self.cfg.optim.lr:g}) or check the data, then rerun (it resumes from that checkpoint)")
        else:
            self.bad_in_row = 0
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
                        self.resume()
                        self.low_d_count = 0

    # ---- outputs ------------------------------------------------------------------------------------------------
    def _full_state(self, eng, use_ema: bool) -> dict[str, torch.Tensor]:
        from megatron_apt.checkpoint.tensor_parallel import consolidate_tp

        with eng.full_parameters(use_ema=use_ema) as sd:
            sd = {k: v.detach().float().cpu() for k, v in sd.items()}
        return consolidate_tp(eng.module, sd)

    def _check_export_space(self, out: Path, engines: dict[str, Any]) -> None:
        """Refuse the export on every rank, before any model is gathered or written, when its fp32 model
        directories would not fit (rank 0 writes them). Each rank counts its share of the parameters: its own
        (tensor- and pipeline-parallel) part divided by the replicas of that part (dp x sp), an upper bound only
        in that norms and biases replicated over tp are counted tp times."""
        from megatron_apt.checkpoint.training import ranks_fit

        copies = {n: {"G": 2, "D": 1}.get(n, 1 + (e.ema is not None)) for n, e in engines.items()}  # + EMA
        local = sum(copies[n] * sum(int(getattr(p, "ds_numel", p.numel())) for p in e.module.parameters())
                    for n, e in engines.items())  # ZeRO-3 keeps the unpartitioned size in ds_numel
        world = dist.get_world_size() if dist.is_initialized() else 1
        ok, need, free = ranks_fit(out, 4 * local // (world // (self.dims.tp * self.dims.pp)), self.device)
        if not ok:
            last = self.latest_checkpoint()
            raise NotEnoughSpaceError(
                f"not enough free space in {out} for the exported models: they need up to {need / 2**30:.2f} GiB, "
                f"{free / 2**30:.2f} GiB are free (rank 0's view); nothing was exported"
                + (f", the checkpoint {last} is intact (tools/convert_checkpoint.py consolidate exports it)"
                   if last else ""))

    def export(self) -> None:
        """Consolidated safetensors model directories of the stage's products under run_dir/export."""
        from megatron_apt.checkpoint.model_dir import save_state_dir

        out = self.run_dir / "export"
        engines = self.method.engines()
        self._ensure_finite_weights("export")
        self._check_export_space(out, engines)
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
        from megatron_apt.checkpoint.consolidate import consolidate

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
        x = self.method.sample(z, mb["text"], mb["text_mask"])
        if x is None or self.dp_rank != 0 or self.ps.get_tensor_model_parallel_rank() != 0:
            return  # the samples are where the model's output is (the last pipeline stage)
        grid = save_grid(x.float().cpu(), self.run_dir / "samples" / f"step-{self.step:08d}.png")
        if _rank() == 0:  # wandb lives on rank 0 (under pipeline parallel the grid is written on the last stage)
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
