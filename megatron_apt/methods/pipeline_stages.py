"""The training stages under pipeline parallel (`parallel.engine=pipeline`): the same losses, noise and
batch scaling as `methods.stages`, with each model split into pipeline stages and every pass run by
megatron-core's schedule (`parallel.pipeline.PipelineRunner`).

Every pipeline stage of a data-parallel rank reads the same micro-batches and draws the same per-sample
noise, so inputs the first stage needs and targets the last stage needs are available where they are used
without communication; only model outputs that feed another model (G's fakes into D, the teacher's ODE
step into the EMA target) move between the last and the first stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_apt.methods.apt import discriminator_loss_from_logits, fused_d_inputs, perturb, split_fused_logits
from megatron_apt.methods.stages import (
    APTMethod,
    ConsistencyMethod,
    FlowMethod,
    Stage,
    per_sample_mse,
    sum_dicts,
)
from megatron_apt.parallel.pipeline import PipeItem, PipelineRunner, load_pipeline_stage, make_pipeline_stage


class _PipelineStageBase(Stage):
    def __init__(self, trainer):
        super().__init__(trainer)
        dt = torch.bfloat16 if (self.cfg.precision == "bf16" and trainer.device.type == "cuda") else None
        self.runner = PipelineRunner(autocast_dtype=dt)

    def stage_of(self, model, layers=True):
        """Cut a whole (already parallelised) model: for models initialised from scratch."""
        P = self.runner.size
        return make_pipeline_stage(model, self.runner.rank, P, self.cfg.parallel.pipeline_layers if layers else None)

    def load_stage(self, kind, path, dcfg=None, head_seed=None):
        """This rank's stage of a model directory, read stage-only, then tensor-parallelised."""
        st = load_pipeline_stage(kind, path, self.runner.rank, self.runner.size,
                                 layers_per_stage=None if kind == "discriminator" else self.cfg.parallel.pipeline_layers,
                                 discriminator_config=dcfg, head_seed=head_seed, device=self.t.device)
        self.t.parallelize(st, extra_blocks=list(st.heads.values()) if kind == "discriminator" else ())
        return st

    def run_and_reduce(self, stage, items, loss_fn, keys, **kw) -> dict[str, float]:
        """One forward+backward call; the per-micro-batch metric dicts that loss_fn returns are summed on the
        last stage and broadcast to every stage (the caller then averages over data parallel)."""
        sums = sum_dicts(self.runner.run(stage, items, loss_fn, **kw))
        dev = self.t.device if self.t.device.type == "cuda" else torch.device("cpu")
        vec = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64, device=dev)
        vec = self.runner.broadcast_from_last(vec)
        return {k: float(v) for k, v in zip(keys, vec.cpu().tolist())}

    def _move_last_to_first(self, tensors, like: list[torch.Tensor]):
        got = self.runner.last_to_first(tensors, [tuple(x.shape) for x in like], torch.float32)
        return got if got is not None else [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in like]

    def _move_first_to_last(self, tensors, like: list[torch.Tensor]):
        got = self.runner.first_to_last(tensors, [tuple(x.shape) for x in like], torch.float32)
        return got if got is not None else [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in like]

    @torch.no_grad()
    def sample(self, z, text, mask):
        """One-step samples on the last pipeline stage (None on the others)."""
        eng = self.engines().get("G") or self.engines()["model"]
        if eng.module.kind == "generator":
            item = PipeItem(z, None, text, mask, {})
            out = self.runner.run(eng.module, [item], None, forward_only=True)
            return out[0] if self.runner.is_last else None
        t = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
        out = self.runner.run(eng.module, [PipeItem(z, t, text, mask, {})], None, forward_only=True)
        return z - out[0] if self.runner.is_last else None


# ------------------------------------------------------------------------------------------------------
class PipelineFlowStage(FlowMethod, _PipelineStageBase):
    name = "flow"

    def __init__(self, trainer):
        super().__init__(trainer)
        if self.cfg.model.init:
            st = self.load_stage("velocity", self.cfg.model.init)
        else:  # from scratch: the whole model is initialised (for identical weights on any layout), then cut
            st = self.stage_of(trainer.load_or_build_backbone(None))
        self.engine = trainer.make_engine(st, lr=self.cfg.optim.lr)
        if self.cfg.apt.ema_decay > 0:
            self.engine.init_ema()

    def engines(self):
        return {"model": self.engine}

    def generator_module(self):
        return self.engine.module

    def train_step(self, step, micro_batches):
        items = []
        for mb in micro_batches:
            xt, t, text, mask, target = self.flow_inputs(mb, step)
            items.append(PipeItem(xt, t, text, mask, {"target": target, "mb": mb}))

        def loss_fn(v, item):
            return self.mse_loss(per_sample_mse(v, item.extra["target"]), item.extra["mb"])

        sums = self.run_and_reduce(self.engine.module, items, loss_fn, ("loss", "n"))
        return self.finish_mse_step(sums, self.ema_decay_at(step))


# ------------------------------------------------------------------------------------------------------
class PipelineConsistencyStage(ConsistencyMethod, _PipelineStageBase):
    """Consistency distillation: teacher (forward only, CFG as a doubled batch) -> the ODE step on the last
    stage -> to the first stage -> EMA target (forward only) -> student forward and backward."""

    name = "cd"

    def __init__(self, trainer):
        super().__init__(trainer)
        c = self.cfg
        if not c.model.init and not c.model.teacher:
            raise ValueError("consistency distillation needs model.init (or model.teacher): the diffusion model")
        teacher_dir = c.model.teacher or c.model.init
        self.teacher = self.load_stage("velocity", teacher_dir).requires_grad_(False).eval()
        if c.precision == "bf16" and trainer.device.type == "cuda":
            self.teacher = self.teacher.to(torch.bfloat16)
        self.engine = trainer.make_engine(self.load_stage("velocity", c.model.init or teacher_dir), lr=c.optim.lr)
        self.engine.init_ema()
        self.init_grid()
        self.init_negative(trainer.encode_prompt(self.cfg.cd.negative_prompt))

    def engines(self):
        return {"model": self.engine}

    def generator_module(self):
        return self.engine.module

    def train_step(self, step, micro_batches):
        prep = [(mb, *self.cd_point(mb, step)) for mb in micro_batches]  # (mb, x_t, t_n, t_{n-1})
        last = self.runner.is_last
        # 1. the teacher's CFG velocity and Euler step t_n -> t_{n-1}, on the last stage
        titems = [PipeItem(*self.teacher_inputs(xt, tn, mb["text"], mb["text_mask"]), {}) for mb, xt, tn, tp in prep]
        with torch.no_grad():
            v = self.runner.run(self.teacher, titems, None, forward_only=True)
        xps = [self.teacher_step(xt, tn, tp, vv) for (mb, xt, tn, tp), vv in zip(prep, v)] if last else None
        # 2. the EMA target at t_{n-1}: its input is needed on the first stage
        xp_first = self._move_last_to_first(xps, [p[1] for p in prep])
        eitems = [PipeItem(xp.to(xt.dtype), tp, mb["text"], mb["text_mask"], {})
                  for (mb, xt, tn, tp), xp in zip(prep, xp_first)]
        with torch.no_grad(), self.engine.ema_weights():
            ve = self.runner.run(self.engine.module, eitems, None, forward_only=True)
        targets = [self.consistency_fn(xp, tp, vv) for (mb, xt, tn, tp), xp, vv in zip(prep, xps, ve)] if last else None
        # 3. the student at t_n, forward and backward
        sitems = [PipeItem(xt, tn, mb["text"], mb["text_mask"], {"mb": mb, "xt": xt, "tn": tn,
                                                                 "target": targets[i] if last else None})
                  for i, (mb, xt, tn, tp) in enumerate(prep)]

        def loss_fn(v, item):
            e = item.extra
            return self.mse_loss(per_sample_mse(self.consistency_fn(e["xt"], e["tn"], v), e["target"]), e["mb"])

        sums = self.run_and_reduce(self.engine.module, sitems, loss_fn, ("loss", "n"))
        return self.finish_mse_step(sums, self.cfg.cd.ema_decay)


# ------------------------------------------------------------------------------------------------------
class PipelineAPTStage(APTMethod, _PipelineStageBase):
    """APT with G and D each split over the pipeline stages (see `parallel.pipeline` for the composition)."""

    name = "apt"

    def __init__(self, trainer):
        super().__init__(trainer)
        self.init_apt()
        c = self.cfg
        # each rank reads only its stage of G-hat and of the diffusion weights; D's fresh heads are drawn from
        # the same seed as the single-stage trainer draws them
        self.G = trainer.make_engine(self.load_stage("generator", c.model.init), lr=c.optim.lr)
        self.D = trainer.make_engine(self.load_stage("discriminator", c.model.teacher, self.dcfg,
                                                     head_seed=self.head_seed), lr=c.optim.d_lr or c.optim.lr)
        self.G.init_ema()

    def engines(self):
        return {"G": self.G, "D": self.D}

    def generator_module(self):
        return self.G.module

    def _fakes_on_first(self, micro_batches, zs):
        """G(z) for every micro-batch, forward only, delivered to the first stage."""
        items = [PipeItem(z, None, mb["text"], mb["text_mask"], {}) for mb, z in zip(micro_batches, zs)]
        with torch.no_grad():
            fakes = self.runner.run(self.G.module, items, None, forward_only=True)
        return self._move_last_to_first(fakes if self.runner.is_last else None, zs)

    def _d_update(self, step, micro_batches, k):
        draws = [self.d_draws(mb, step, k) for mb in micro_batches]
        fakes = self._fakes_on_first(micro_batches, [d[0] for d in draws])
        use_r1 = self.apt.use_r1
        items = []
        for mb, (z, eps, t_real, t_fake), fake in zip(micro_batches, draws, fakes):
            x = mb["x"]
            xin, tin, text, mask, _ = fused_d_inputs(x, perturb(x, eps, self.apt), fake.to(x.dtype), t_real, t_fake,
                                                     mb["text"], mb["text_mask"], use_r1=use_r1)
            items.append(PipeItem(xin, tin, text, mask, {"mb": mb}))

        def loss_fn(logits, item):
            mb = item.extra["mb"]
            real_l, pert_l, fake_l = split_fused_logits(logits.float(), mb["x"].shape[0], use_r1=use_r1)
            loss, m = discriminator_loss_from_logits(real_l, fake_l, pert_l, cfg=self.apt, reduction="sum")
            return loss * self.scale(mb), self.d_metric_sums(m, mb)

        keys = self.D_SUM_KEYS + self.D_MEAN_KEYS + ("n",)
        sums = self.run_and_reduce(self.D.module, items, loss_fn, keys)
        return self.d_summary(sums, self.D.step())

    def _g_update(self, step, micro_batches):
        draws = [self.g_draws(mb, step) for mb in micro_batches]
        zs = [z for z, _ in draws]
        fakes = self._fakes_on_first(micro_batches, zs)
        # dL_G / d fake through the frozen D, on the first stage
        items = [PipeItem(fake.to(mb["x"].dtype), t, mb["text"], mb["text_mask"], {"mb": mb})
                 for mb, (z, t), fake in zip(micro_batches, draws, fakes)]

        def leaf(item):
            item.extra["leaf"] = item.x.detach().requires_grad_(True)
            return item.extra["leaf"]

        def d_loss_fn(logits, item):
            mb = item.extra["mb"]
            loss = F.softplus(-logits.float()).sum()  # Eq. 2, non-saturating
            return loss * self.scale(mb), {"g_loss": float(loss.detach()) * mb["weight"],
                                           "n": mb["weight"] * mb["x"].shape[0]}

        self.D.module.requires_grad_(False)
        try:
            sums = self.run_and_reduce(self.D.module, items, d_loss_fn, ("g_loss", "n"), input_hook=leaf)
        finally:
            self.D.module.requires_grad_(True)
        grads = [it.extra["leaf"].grad.float() for it in items] if self.runner.is_first else None
        grads = self._move_first_to_last(grads, zs)
        # G forward and backward with the surrogate <G(z), dL/dfake>: its gradient is dL_G/dG
        gitems = [PipeItem(z, None, mb["text"], mb["text_mask"], {"g": g})
                  for mb, z, g in zip(micro_batches, zs, grads)]
        self.runner.run(self.G.module, gitems, lambda out, item: ((out.float() * item.extra["g"]).sum(), {}))
        gnorm = self.G.step()
        self.G.update_ema(self.cfg.apt.ema_decay)
        return {"g_loss": self.t.global_mean(sums["g_loss"], sums["n"]), "g_grad_norm": gnorm}


PIPELINE_STAGE_CLASSES = {"flow": PipelineFlowStage, "cd": PipelineConsistencyStage, "apt_image": PipelineAPTStage,
                          "apt_video": PipelineAPTStage}
