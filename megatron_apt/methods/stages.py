"""The four training stages, each a class whose `train_step` performs one optimizer update (of G, for
APT) over this rank's micro-batches of an exact global batch. The trainer owns the loop, checkpoints and
logging; a stage owns its models, engines and losses.

Micro-batch items handed to `train_step`: dict(x [B,C,T,H,W], text [B,L,Dt], text_mask [B,L] bool,
positions: global-batch positions of the B samples (for per-sample noise), weight: 0.0 for a padding
micro-step that must still run (ZeRO-3 gathers parameters collectively) else 1.0).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_apt.config.model import DiscriminatorConfig
from megatron_apt.methods.apt import APTConfig, discriminator_loss, generator_loss, shift_timestep
from megatron_apt.trainer.batching import per_sample_rand, per_sample_randn


def _null_text(text, mask):
    """The unconditional text: zeros, fully masked (text dropout and classifier-free guidance)."""
    return torch.zeros_like(text), torch.zeros_like(mask)


class Stage:
    name = "base"

    def __init__(self, trainer):
        self.t = trainer
        self.cfg = trainer.cfg

    # helpers shared by the stages -------------------------------------------------------------------
    def noise(self, mb, step, purpose):
        x = mb["x"]
        return per_sample_randn(x.shape[1:], self.cfg.seed, step, purpose, mb["positions"], x.device, x.dtype)

    def uniform(self, mb, step, purpose):
        return per_sample_rand(self.cfg.seed, step, purpose, mb["positions"], mb["x"].device, torch.float32)

    def scale(self, mb) -> float:
        return self.t.plan.loss_scale() * mb["weight"]

    def engines(self) -> dict[str, Any]:
        raise NotImplementedError

    def generator_module(self):
        """The MMDiT to sample from / export as the stage's product."""
        raise NotImplementedError

    def train_step(self, step: int, micro_batches: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    def model_flops(self, x_shape, text_len: int) -> float:
        return float("nan")


# ------------------------------------------------------------------------------------------------------
class FlowMatchingStage(Stage):
    """Flow-matching pretraining: x_t = (1 - t) x0 + t eps, target v = eps - x0, shifted timesteps, text
    dropout for classifier-free guidance."""

    name = "flow"

    def __init__(self, trainer):
        super().__init__(trainer)
        model = trainer.load_or_build_backbone(self.cfg.model.init)
        self.engine = trainer.make_engine(model, lr=self.cfg.optim.lr)
        if self.cfg.apt.ema_decay > 0:
            self.engine.init_ema()

    def engines(self):
        return {"model": self.engine}

    def generator_module(self):
        return self.engine.module

    def shift_for(self, x):
        if self.cfg.flow.shift is not None:
            return self.cfg.flow.shift
        pt, ph, pw = self.engine.module.config.patch_size
        tokens = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        return max(1.0, math.sqrt(tokens / 256.0))  # SD3's resolution-dependent shift

    def train_step(self, step, micro_batches):
        tot = {"loss": 0.0, "n": 0.0}
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
            xt = (1 - tb) * x0 + tb * eps
            v = self.engine(xt, t, text, mask)
            per = (v.float() - (eps - x0).float()).pow(2).flatten(1).mean(1)
            self.engine.backward(per.sum() * self.scale(mb))
            tot["loss"] += float(per.detach().sum()) * mb["weight"]
            tot["n"] += len(per) * mb["weight"]
        gnorm = self.engine.step()
        if self.engine.ema is not None:
            self.engine.update_ema(self.cfg.apt.ema_decay)
        return {"loss": self.t.global_mean(tot["loss"], tot["n"]), "grad_norm": gnorm}

    def model_flops(self, x_shape, text_len):
        from megatron_apt.metrics.flops import flow_matching_step_flops, visual_tokens

        cfg = self.engine.module.config
        return float(flow_matching_step_flops(cfg, 1, visual_tokens(cfg, x_shape[1:]), text_len).model)


# ------------------------------------------------------------------------------------------------------
class ConsistencyStage(Stage):
    """Discrete-time consistency distillation with MSE (§3.2): the frozen diffusion teacher takes one
    Euler step with constant CFG (7.5) and a fixed negative prompt from t_n to t_{n-1}; the student's
    consistency function f(x, t) = x - t v(x, t) at t_n is pulled to the EMA target's at t_{n-1}."""

    name = "cd"

    def __init__(self, trainer):
        super().__init__(trainer)
        if not self.cfg.model.init and not self.cfg.model.teacher:
            raise ValueError("consistency distillation needs model.init (or model.teacher): the diffusion model")
        teacher_dir = self.cfg.model.teacher or self.cfg.model.init
        student = trainer.load_or_build_backbone(self.cfg.model.init or teacher_dir)
        self.teacher = trainer.load_or_build_backbone(teacher_dir, parallel=True).requires_grad_(False).eval()
        if self.cfg.precision == "bf16" and self.t.device.type == "cuda":
            self.teacher = self.teacher.to(torch.bfloat16)
        self.engine = trainer.make_engine(student, lr=self.cfg.optim.lr)
        self.engine.init_ema()  # the target network
        n = self.cfg.cd.num_steps
        grid = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
        self.grid = shift_timestep(grid, self.cfg.cd.shift).float()

    def engines(self):
        return {"model": self.engine}

    def generator_module(self):
        return self.engine.module

    @torch.no_grad()
    def teacher_velocity(self, x, t, text, mask):
        dt = next(self.teacher.parameters()).dtype
        nt, nm = _null_text(text, mask)  # the fixed negative prompt (its encoding: the null text)
        v = self.teacher(torch.cat([x, x]).to(dt), torch.cat([t, t]).to(dt), torch.cat([text, nt]).to(dt),
                         torch.cat([mask, nm]))
        vc, vu = v.float().chunk(2)
        return vu + self.cfg.cd.cfg_scale * (vc - vu)

    def train_step(self, step, micro_batches):
        tot = {"loss": 0.0, "n": 0.0}
        n_steps = self.cfg.cd.num_steps
        for mb in micro_batches:
            x0, text, mask = mb["x"], mb["text"], mb["text_mask"]
            eps = self.noise(mb, step, "cd.eps")
            idx = (self.uniform(mb, step, "cd.n") * n_steps).long().clamp(0, n_steps - 1) + 1  # n in 1..N
            tn = self.grid.to(x0.device)[idx].to(x0.dtype)
            tp = self.grid.to(x0.device)[idx - 1].to(x0.dtype)
            xt = (1 - tn.view(-1, 1, 1, 1, 1)) * x0 + tn.view(-1, 1, 1, 1, 1) * eps
            v_t = self.teacher_velocity(xt, tn, text, mask)
            xp = (xt.float() + (tp - tn).view(-1, 1, 1, 1, 1).float() * v_t).to(x0.dtype)
            with torch.no_grad(), self.engine.ema_weights():
                target = xp.float() - tp.view(-1, 1, 1, 1, 1).float() * self.engine(xp, tp, text, mask).float()
            pred = xt.float() - tn.view(-1, 1, 1, 1, 1).float() * self.engine(xt, tn, text, mask).float()
            per = (pred - target).pow(2).flatten(1).mean(1)
            self.engine.backward(per.sum() * self.scale(mb))
            tot["loss"] += float(per.detach().sum()) * mb["weight"]
            tot["n"] += len(per) * mb["weight"]
        gnorm = self.engine.step()
        self.engine.update_ema(self.cfg.cd.ema_decay)
        return {"loss": self.t.global_mean(tot["loss"], tot["n"]), "grad_norm": gnorm}

    def model_flops(self, x_shape, text_len):
        from megatron_apt.metrics.flops import consistency_step_flops, visual_tokens

        cfg = self.engine.module.config
        return float(consistency_step_flops(cfg, 1, visual_tokens(cfg, x_shape[1:]), text_len).model)


# ------------------------------------------------------------------------------------------------------
class APTStage(Stage):
    """Adversarial post-training (§3.3-3.5): alternating D and G updates, aR1 on every D step, EMA of G."""

    name = "apt"

    def __init__(self, trainer):
        super().__init__(trainer)
        from megatron_apt.models.discriminator import Discriminator, OneStepGenerator

        c = self.cfg
        if not c.model.init or not c.model.teacher:
            raise ValueError("APT needs model.init (the consistency-distilled G-hat, or the image stage's EMA "
                             "generator) and model.teacher (the diffusion weights for the discriminator)")
        self.apt = APTConfig(r1_lambda=c.apt.r1_lambda, r1_sigma=c.apt.r1_sigma, timestep_shift=c.apt.timestep_shift,
                             use_r1=c.apt.use_r1)
        G = OneStepGenerator(trainer.load_or_build_backbone(c.model.init, parallel=False))
        D = Discriminator(trainer.load_or_build_backbone(c.model.teacher, parallel=False),
                          DiscriminatorConfig(head_layers=tuple(c.model.head_layers) if c.model.head_layers else None))
        D.init_heads(generator=torch.Generator().manual_seed(c.seed + 17))
        trainer.parallelize(G)
        trainer.parallelize(D, extra_blocks=list(D.heads))
        self.G = trainer.make_engine(G, lr=c.optim.lr)
        self.D = trainer.make_engine(D, lr=c.optim.d_lr or c.optim.lr)
        self.G.init_ema()
        self.low_d_steps = 0

    def engines(self):
        return {"G": self.G, "D": self.D}

    def generator_module(self):
        return self.G.module.backbone

    def _d_update(self, step, micro_batches, k):
        acc: dict[str, float] = {}
        n = 0.0
        for mb in micro_batches:
            x, text, mask = mb["x"], mb["text"], mb["text_mask"]
            tag = f"apt.d{k}"
            z = self.noise(mb, step, tag + ".z")
            eps = self.noise(mb, step, tag + ".eps")
            t_real = shift_timestep(self.uniform(mb, step, tag + ".tr"), self.apt.timestep_shift).to(x.dtype)
            t_fake = shift_timestep(self.uniform(mb, step, tag + ".tf"), self.apt.timestep_shift).to(x.dtype)
            loss, m = discriminator_loss(self.D, self.G.raw, x, text, mask, cfg=self.apt, z=z, t_real=t_real,
                                         t_fake=t_fake, eps=eps, reduction="sum")
            self.D.backward(loss * self.scale(mb))
            w = mb["weight"] * x.shape[0]
            for key in ("d_adv", "ar1"):
                acc[key] = acc.get(key, 0.0) + float(m[key]) * mb["weight"]  # sums over samples
            for key in ("logit_real", "logit_fake", "d_acc"):
                acc[key] = acc.get(key, 0.0) + float(m[key]) * w
            n += w
        gnorm = self.D.step()
        out = {k: self.t.global_mean(v, n) for k, v in acc.items()}
        out["d_loss"] = out["d_adv"] + (self.apt.r1_lambda * out["ar1"] if self.apt.use_r1 else 0.0)
        out["logit_gap"] = out["logit_real"] - out["logit_fake"]
        out["d_grad_norm"] = gnorm
        return out

    def _g_update(self, step, micro_batches):
        D = self.D.module
        D.requires_grad_(False)
        tot, n = 0.0, 0.0
        try:
            for mb in micro_batches:
                x, text, mask = mb["x"], mb["text"], mb["text_mask"]
                z = self.noise(mb, step, "apt.g.z")
                t = shift_timestep(self.uniform(mb, step, "apt.g.t"), self.apt.timestep_shift).to(x.dtype)
                loss, m, fake = generator_loss(self.D.raw, self.G, text, mask, shape=x.shape, cfg=self.apt, z=z, t=t,
                                               reduction="sum")
                self.G.backward(loss * self.scale(mb))
                tot += float(loss.detach()) * mb["weight"]
                n += x.shape[0] * mb["weight"]
        finally:
            D.requires_grad_(True)
        gnorm = self.G.step()
        self.G.update_ema(self.cfg.apt.ema_decay)
        return {"g_loss": self.t.global_mean(tot, n), "g_grad_norm": gnorm}

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


STAGE_CLASSES = {"flow": FlowMatchingStage, "cd": ConsistencyStage, "apt_image": APTStage, "apt_video": APTStage}

