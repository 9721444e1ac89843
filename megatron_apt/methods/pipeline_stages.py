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

from megatron_apt.config.model import DiscriminatorConfig
from megatron_apt.methods.apt import APTConfig, shift_timestep
from megatron_apt.methods.stages import Stage, _null_text
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

    def reduce_metrics(self, sums: dict[str, float], keys: list[str]) -> dict[str, float]:
        """Sums held by the last stage -> on every stage (then averaged over data parallel by the caller)."""
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
class PipelineFlowStage(_PipelineStageBase):
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
            x0, text, mask = mb["x"], mb["text"], mb["text_mask"]
            eps = self.noise(mb, step, "flow.eps")
            t = shift_timestep(self.uniform(mb, step, "flow.t"), self.shift_for(x0)).to(x0.dtype)
            drop = self.uniform(mb, step, "flow.drop") < self.cfg.flow.text_dropout
            if drop.any():
                nt, nm = _null_text(text, mask)
                text = torch.where(drop[:, None, None], nt, text)
                mask = torch.where(drop[:, None], nm, mask)
            tb = t.view(-1, 1, 1, 1, 1)
            items.append(PipeItem((1 - tb) * x0 + tb * eps, t, text, mask, {"target": eps - x0, "mb": mb}))

        def loss_fn(v, item):
            per = (v.float() - item.extra["target"].float()).pow(2).flatten(1).mean(1)
            w = item.extra["mb"]["weight"]
            return per.sum() * self.scale(item.extra["mb"]), {"loss": float(per.detach().sum()) * w, "n": len(per) * w}

        res = self.runner.run(self.engine.module, items, loss_fn)
        sums = self.reduce_metrics({k: sum(r[k] for r in res) for k in ("loss", "n")} if res else {}, ["loss", "n"])
        gnorm = self.engine.step()
        if self.engine.ema is not None:
            self.engine.update_ema(self.cfg.apt.ema_decay)
        return {"loss": self.t.global_mean(sums["loss"], sums["n"]), "grad_norm": gnorm}

    def shift_for(self, x):
        from megatron_apt.methods.stages import FlowMatchingStage

        return FlowMatchingStage.shift_for(self, x)

    def model_flops(self, x_shape, text_len):
        from megatron_apt.metrics.flops import flow_matching_step_flops, visual_tokens

        cfg = self.engine.module.config
        return float(flow_matching_step_flops(cfg, 1, visual_tokens(cfg, x_shape[1:]), text_len).model)


# ------------------------------------------------------------------------------------------------------
class PipelineConsistencyStage(_PipelineStageBase):
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
        n = c.cd.num_steps
        grid = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
        self.grid = shift_timestep(grid, c.cd.shift).float()

    def engines(self):
        return {"model": self.engine}

    def generator_module(self):
        return self.engine.module

    def train_step(self, step, micro_batches):
        n_steps, w_cfg = self.cfg.cd.num_steps, self.cfg.cd.cfg_scale
        prep = []
        for mb in micro_batches:
            x0, text, mask = mb["x"], mb["text"], mb["text_mask"]
            eps = self.noise(mb, step, "cd.eps")
            idx = (self.uniform(mb, step, "cd.n") * n_steps).long().clamp(0, n_steps - 1) + 1
            tn = self.grid.to(x0.device)[idx].to(x0.dtype)
            tp = self.grid.to(x0.device)[idx - 1].to(x0.dtype)
            xt = (1 - tn.view(-1, 1, 1, 1, 1)) * x0 + tn.view(-1, 1, 1, 1, 1) * eps
            prep.append((mb, xt, tn, tp))
        # 1. the teacher's CFG velocity and Euler step t_n -> t_{n-1}, on the last stage
        titems = []
        for mb, xt, tn, tp in prep:
            nt, nm = _null_text(mb["text"], mb["text_mask"])
            titems.append(PipeItem(torch.cat([xt, xt]), torch.cat([tn, tn]), torch.cat([mb["text"], nt]),
                                   torch.cat([mb["text_mask"], nm]), {}))
        with torch.no_grad():
            v = self.runner.run(self.teacher, titems, None, forward_only=True)
        xps = []
        if self.runner.is_last:
            for (mb, xt, tn, tp), vv in zip(prep, v):
                vc, vu = vv.float().chunk(2)
                vcfg = vu + w_cfg * (vc - vu)
                xps.append((xt.float() + (tp - tn).view(-1, 1, 1, 1, 1).float() * vcfg).to(xt.dtype))
        # 2. the EMA target at t_{n-1}: its input is needed on the first stage
        xp_first = self._move_last_to_first(xps if self.runner.is_last else None, [p[1] for p in prep])
        eitems = [PipeItem(xp.to(xt.dtype), tp, mb["text"], mb["text_mask"], {})
                  for (mb, xt, tn, tp), xp in zip(prep, xp_first)]
        with torch.no_grad(), self.engine.ema_weights():
            ve = self.runner.run(self.engine.module, eitems, None, forward_only=True)
        targets = []
        if self.runner.is_last:
            for (mb, xt, tn, tp), xp, vv in zip(prep, xps, ve):
                targets.append(xp.float() - tp.view(-1, 1, 1, 1, 1).float() * vv.float())
        # 3. the student at t_n, forward and backward
        sitems = [PipeItem(xt, tn, mb["text"], mb["text_mask"],
                           {"mb": mb, "xt": xt, "tn": tn, "target": targets[i] if targets else None})
                  for i, (mb, xt, tn, tp) in enumerate(prep)]

        def loss_fn(v, item):
            e = item.extra
            pred = e["xt"].float() - e["tn"].view(-1, 1, 1, 1, 1).float() * v.float()
            per = (pred - e["target"]).pow(2).flatten(1).mean(1)
            w = e["mb"]["weight"]
            return per.sum() * self.scale(e["mb"]), {"loss": float(per.detach().sum()) * w, "n": len(per) * w}

        res = self.runner.run(self.engine.module, sitems, loss_fn)
        sums = self.reduce_metrics({k: sum(r[k] for r in res) for k in ("loss", "n")} if res else {}, ["loss", "n"])
        gnorm = self.engine.step()
        self.engine.update_ema(self.cfg.cd.ema_decay)
        return {"loss": self.t.global_mean(sums["loss"], sums["n"]), "grad_norm": gnorm}

    def model_flops(self, x_shape, text_len):
        from megatron_apt.metrics.flops import consistency_step_flops, visual_tokens

        cfg = self.engine.module.config
        return float(consistency_step_flops(cfg, 1, visual_tokens(cfg, x_shape[1:]), text_len).model)


# ------------------------------------------------------------------------------------------------------
class PipelineAPTStage(_PipelineStageBase):
    """APT with G and D each split over the pipeline stages (see `parallel.pipeline` for the composition)."""

    name = "apt"
    D_KEYS = ["d_adv", "ar1", "logit_real", "logit_fake", "d_acc", "n"]

    def __init__(self, trainer):
        super().__init__(trainer)
        from megatron_apt.models.discriminator import Discriminator, OneStepGenerator

        c = self.cfg
        if not c.model.init or not c.model.teacher:
            raise ValueError("APT needs model.init (the consistency-distilled G-hat, or the image stage's EMA "
                             "generator) and model.teacher (the diffusion weights for the discriminator)")
        self.apt = APTConfig(r1_lambda=c.apt.r1_lambda, r1_sigma=c.apt.r1_sigma, timestep_shift=c.apt.timestep_shift,
                             use_r1=c.apt.use_r1)
        dcfg = DiscriminatorConfig(head_layers=tuple(c.model.head_layers) if c.model.head_layers else None)
        # each rank reads only its stage of G-hat and of the diffusion weights; D's fresh heads are drawn from
        # the same seed as the single-stage trainer draws them
        self.G = trainer.make_engine(self.load_stage("generator", c.model.init), lr=c.optim.lr)
        self.D = trainer.make_engine(self.load_stage("discriminator", c.model.teacher, dcfg, head_seed=c.seed + 17),
                                     lr=c.optim.d_lr or c.optim.lr)
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
        tag = f"apt.d{k}"
        zs = [self.noise(mb, step, tag + ".z") for mb in micro_batches]
        fakes = self._fakes_on_first(micro_batches, zs)
        use_r1 = self.apt.use_r1
        items = []
        for mb, fake in zip(micro_batches, fakes):
            x, text, mask = mb["x"], mb["text"], mb["text_mask"]
            eps = self.noise(mb, step, tag + ".eps")
            t_real = shift_timestep(self.uniform(mb, step, tag + ".tr"), self.apt.timestep_shift).to(x.dtype)
            t_fake = shift_timestep(self.uniform(mb, step, tag + ".tf"), self.apt.timestep_shift).to(x.dtype)
            fake = fake.to(x.dtype)
            if use_r1:  # one fused D pass over [real, perturbed real (same t), fake]
                xin, tin, rep = torch.cat([x, x + self.apt.r1_sigma * eps, fake]), torch.cat([t_real, t_real, t_fake]), 3
            else:
                xin, tin, rep = torch.cat([x, fake]), torch.cat([t_real, t_fake]), 2
            items.append(PipeItem(xin, tin, torch.cat([text] * rep), torch.cat([mask] * rep), {"mb": mb}))

        def loss_fn(logits, item):
            mb = item.extra["mb"]
            B = mb["x"].shape[0]
            if use_r1:
                real_l, pert_l, fake_l = logits.float().split(B)
                r1 = (real_l - pert_l).pow(2).sum()
            else:
                real_l, fake_l = logits.float().split(B)
                r1 = torch.zeros((), device=logits.device)
            adv = (F.softplus(-real_l) + F.softplus(fake_l)).sum()
            loss = adv + (self.apt.r1_lambda * r1 if use_r1 else 0.0)
            w = mb["weight"]
            rl, fl = real_l.detach(), fake_l.detach()
            m = {"d_adv": float(adv.detach()) * w, "ar1": float(r1.detach()) * w, "logit_real": float(rl.mean()) * w * B,
                 "logit_fake": float(fl.mean()) * w * B,
                 "d_acc": float(0.5 * ((rl > 0).float().mean() + (fl < 0).float().mean())) * w * B, "n": w * B}
            return loss * self.scale(mb), m

        res = self.runner.run(self.D.module, items, loss_fn)
        sums = self.reduce_metrics({k: sum(r[k] for r in res) for k in self.D_KEYS} if res else {}, self.D_KEYS)
        gnorm = self.D.step()
        out = {k: self.t.global_mean(sums[k], sums["n"]) for k in self.D_KEYS if k != "n"}
        out["d_loss"] = out["d_adv"] + (self.apt.r1_lambda * out["ar1"] if use_r1 else 0.0)
        out["logit_gap"] = out["logit_real"] - out["logit_fake"]
        out["d_grad_norm"] = gnorm
        return out

    def _g_update(self, step, micro_batches):
        zs = [self.noise(mb, step, "apt.g.z") for mb in micro_batches]
        fakes = self._fakes_on_first(micro_batches, zs)
        # dL_G / d fake through the frozen D, on the first stage
        items = []
        for mb, fake in zip(micro_batches, fakes):
            x = mb["x"]
            t = shift_timestep(self.uniform(mb, step, "apt.g.t"), self.apt.timestep_shift).to(x.dtype)
            items.append(PipeItem(fake.to(x.dtype), t, mb["text"], mb["text_mask"], {"mb": mb}))

        def leaf(item):
            item.extra["leaf"] = item.x.detach().requires_grad_(True)
            return item.extra["leaf"]

        def d_loss_fn(logits, item):
            mb = item.extra["mb"]
            loss = F.softplus(-logits.float()).sum()
            return loss * self.scale(mb), {"g_loss": float(loss.detach()) * mb["weight"],
                                           "n": mb["weight"] * mb["x"].shape[0]}

        self.D.module.requires_grad_(False)
        try:
            res = self.runner.run(self.D.module, items, d_loss_fn, input_hook=leaf)
        finally:
            self.D.module.requires_grad_(True)
        grads = [it.extra["leaf"].grad.float() for it in items] if self.runner.is_first else None
        grads = self._move_first_to_last(grads, zs)
        # G forward and backward with the surrogate <G(z), dL/dfake>: its gradient is dL_G/dG
        gitems = [PipeItem(z, None, mb["text"], mb["text_mask"], {"g": g})
                  for mb, z, g in zip(micro_batches, zs, grads)]
        self.runner.run(self.G.module, gitems, lambda out, item: ((out.float() * item.extra["g"]).sum(), {}))
        sums = self.reduce_metrics({k: sum(r[k] for r in res) for k in ("g_loss", "n")} if res else {},
                                   ["g_loss", "n"])
        gnorm = self.G.step()
        self.G.update_ema(self.cfg.apt.ema_decay)
        return {"g_loss": self.t.global_mean(sums["g_loss"], sums["n"]), "g_grad_norm": gnorm}

    def train_step(self, step, micro_batches):
        out: dict[str, float] = {}
        for k in range(self.cfg.apt.d_steps_per_g_step):
            out.update(self._d_update(step, micro_batches, k))
        out.update(self._g_update(step, micro_batches))
        out["loss"] = out["g_loss"]
        return out

    def model_flops(self, x_shape, text_len):
        from megatron_apt.metrics.flops import apt_step_flops, visual_tokens

        cfg = self.G.module.config
        dcfg = DiscriminatorConfig(head_layers=tuple(self.D.module.head_layers))
        return float(apt_step_flops(cfg, 1, visual_tokens(cfg, x_shape[1:]), text_len, dcfg,
                                    use_r1=self.apt.use_r1).model)


PIPELINE_STAGE_CLASSES = {"flow": PipelineFlowStage, "cd": PipelineConsistencyStage, "apt_image": PipelineAPTStage,
                          "apt_video": PipelineAPTStage}
