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
from megatron_apt.models.conditioning import cfg_text_batch, null_text
from megatron_apt.methods.apt import APTConfig, discriminator_loss, generator_loss, shift_timestep
from megatron_apt.trainer.batching import per_sample_rand, per_sample_randn


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

    def mse_loss(self, per, mb):
        """(the micro-batch's scaled loss, its metric sums) from per-sample losses."""
        w = mb["weight"]
        return per.sum() * self.scale(mb), {"loss": float(per.detach().sum()) * w, "n": len(per) * w}

    def finish_mse_step(self, sums: dict[str, float], ema_decay: float | None) -> dict[str, float]:
        """Optimizer step (and EMA) of the single-model stages; the step's mean loss and gradient norm."""
        gnorm = self.engine.step()
        if ema_decay is not None:
            self.engine.update_ema(ema_decay)
        return {"loss": self.t.global_mean(sums.get("loss", 0.0), sums.get("n", 0.0)), "grad_norm": gnorm}

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
# the methods' inputs and losses, shared by these stages and their pipeline-parallel versions
# (methods/pipeline_stages.py); they need self.cfg, self.noise, self.uniform and the stage's engines
# ------------------------------------------------------------------------------------------------------
def _bcast(t):
    return t.view(-1, 1, 1, 1, 1)


def per_sample_mse(out, target):
    return (out.float() - target.float()).pow(2).flatten(1).mean(1)


class FlowMethod:
    """Flow-matching pretraining: x_t = (1 - t) x0 + t eps, target v = eps - x0, shifted timesteps, text
    dropout for classifier-free guidance."""

    def ema_decay_at(self, step: int) -> float | None:
        """The EMA decay of update `step` (None without an EMA): from scratch the decay is ramped as
        min(decay, (1 + n) / (10 + n)) so that the random initialisation leaves the average."""
        if self.engine.ema is None:
            return None
        decay = self.cfg.apt.ema_decay
        return min(decay, (1.0 + step) / (10.0 + step)) if self.cfg.flow.ema_warmup else decay

    def shift_for(self, x):
        if self.cfg.flow.shift is not None:
            return self.cfg.flow.shift
        pt, ph, pw = self.engine.module.config.patch_size
        tokens = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        return max(1.0, math.sqrt(tokens / 256.0))  # SD3's resolution-dependent shift

    def flow_inputs(self, mb, step):
        """(x_t, t, text, text_mask, target velocity) of a micro-batch."""
        x0, text, mask = mb["x"], mb["text"], mb["text_mask"]
        eps = self.noise(mb, step, "flow.eps")
        t = shift_timestep(self.uniform(mb, step, "flow.t"), self.shift_for(x0)).to(x0.dtype)
        drop = self.uniform(mb, step, "flow.drop") < self.cfg.flow.text_dropout
        if drop.any():
            nt, nm = null_text(text, mask)
            text = torch.where(drop[:, None, None], nt, text)
            mask = torch.where(drop[:, None], nm, mask)
        return (1 - _bcast(t)) * x0 + _bcast(t) * eps, t, text, mask, eps - x0

    def model_flops(self, x_shape, text_len):
        from megatron_apt.metrics.flops import flow_matching_step_flops, visual_tokens

        cfg = self.engine.module.config
        return float(flow_matching_step_flops(cfg, 1, visual_tokens(cfg, x_shape[1:]), text_len).model)


class ConsistencyMethod:
    """Discrete-time consistency distillation with MSE (§3.2): the frozen diffusion teacher takes one Euler
    step with constant CFG (7.5) and a fixed negative prompt from t_n to t_{n-1}; the student's consistency
    function f(x, t) = x - t v(x, t) at t_n is pulled to the EMA target's at t_{n-1}."""

    def init_grid(self):
        grid = torch.linspace(0.0, 1.0, self.cfg.cd.num_steps + 1, dtype=torch.float64)
        self.grid = shift_timestep(grid, self.cfg.cd.shift).float()

    def cd_point(self, mb, step):
        """(x at t_n, t_n, t_{n-1}) of a micro-batch, n drawn per sample in 1..N."""
        x0, n_steps = mb["x"], self.cfg.cd.num_steps
        eps = self.noise(mb, step, "cd.eps")
        idx = (self.uniform(mb, step, "cd.n") * n_steps).long().clamp(0, n_steps - 1) + 1
        tn = self.grid.to(x0.device)[idx].to(x0.dtype)
        tp = self.grid.to(x0.device)[idx - 1].to(x0.dtype)
        return (1 - _bcast(tn)) * x0 + _bcast(tn) * eps, tn, tp

    def init_negative(self, negative):
        """The fixed negative prompt's encoding (features [1, L, D], mask [1, L]), or None for the null text."""
        self.negative = negative

    def teacher_inputs(self, x, t, text, mask):
        """The conditional and the unconditional pass as one batch; the unconditional text is the encoded fixed
        negative prompt (§3.2), or the null text when `cd.negative_prompt` is empty."""
        text2, mask2 = cfg_text_batch(text, mask, getattr(self, "negative", None))
        return torch.cat([x, x]), torch.cat([t, t]), text2, mask2

    def teacher_step(self, xt, tn, tp, v2):
        """The Euler step t_n -> t_{n-1} with the CFG velocity of the doubled teacher output v2."""
        vc, vu = v2.float().chunk(2)
        v = vu + self.cfg.cd.cfg_scale * (vc - vu)
        return (xt.float() + _bcast(tp - tn).float() * v).to(xt.dtype)

    @staticmethod
    def consistency_fn(x, t, v):
        return x.float() - _bcast(t).float() * v.float()

    def model_flops(self, x_shape, text_len):
        from megatron_apt.metrics.flops import consistency_step_flops, visual_tokens

        cfg = self.engine.module.config
        return float(consistency_step_flops(cfg, 1, visual_tokens(cfg, x_shape[1:]), text_len).model)


class APTMethod:
    """Adversarial post-training (§3.3-3.5): per-sample draws, D's metric sums and their summary."""

    D_SUM_KEYS = ("d_adv", "ar1")  # summed over samples by the loss (reduction 'sum')
    D_MEAN_KEYS = ("logit_real", "logit_fake", "d_acc")  # per micro-batch means, weighted by its samples

    def init_apt(self):
        c = self.cfg
        if not c.model.init or not c.model.teacher:
            raise ValueError("APT needs model.init (the consistency-distilled G-hat, or the image stage's EMA "
                             "generator) and model.teacher (the diffusion weights for the discriminator)")
        self.apt = APTConfig(r1_lambda=c.apt.r1_lambda, r1_sigma=c.apt.r1_sigma, r1_sigma_means=c.apt.r1_sigma_means,
                             timestep_shift=c.apt.timestep_shift, use_r1=c.apt.use_r1)
        self.dcfg = DiscriminatorConfig(head_layers=tuple(c.model.head_layers) if c.model.head_layers else None)
        self.head_seed = c.seed + 17

    def d_draws(self, mb, step, k):
        """(z, eps, t_real, t_fake) of the k-th discriminator update."""
        x, tag = mb["x"], f"apt.d{k}"
        z = self.noise(mb, step, tag + ".z")
        eps = self.noise(mb, step, tag + ".eps")
        t_real = shift_timestep(self.uniform(mb, step, tag + ".tr"), self.apt.timestep_shift).to(x.dtype)
        t_fake = shift_timestep(self.uniform(mb, step, tag + ".tf"), self.apt.timestep_shift).to(x.dtype)
        return z, eps, t_real, t_fake

    def g_draws(self, mb, step):
        z = self.noise(mb, step, "apt.g.z")
        t = shift_timestep(self.uniform(mb, step, "apt.g.t"), self.apt.timestep_shift).to(mb["x"].dtype)
        return z, t

    def d_metric_sums(self, m, mb) -> dict[str, float]:
        """One micro-batch's contribution to the discriminator metrics (m: discriminator_loss_from_logits's)."""
        w = mb["weight"] * mb["x"].shape[0]
        out = {k: float(m[k]) * mb["weight"] for k in self.D_SUM_KEYS}
        out.update({k: float(m[k]) * w for k in self.D_MEAN_KEYS})
        out["n"] = w
        return out

    def d_summary(self, sums: dict[str, float], gnorm: float) -> dict[str, float]:
        out = {k: self.t.global_mean(sums.get(k, 0.0), sums.get("n", 0.0))
               for k in self.D_SUM_KEYS + self.D_MEAN_KEYS}
        out["d_loss"] = out["d_adv"] + (self.apt.r1_lambda * out["ar1"] if self.apt.use_r1 else 0.0)
        out["logit_gap"] = out["logit_real"] - out["logit_fake"]
        out["d_grad_norm"] = gnorm
        return out

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


def sum_dicts(dicts) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


# ------------------------------------------------------------------------------------------------------
class FlowMatchingStage(FlowMethod, Stage):
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

    def train_step(self, step, micro_batches):
        sums = []
        for mb in micro_batches:
            xt, t, text, mask, target = self.flow_inputs(mb, step)
            loss, m = self.mse_loss(per_sample_mse(self.engine(xt, t, text, mask), target), mb)
            self.engine.backward(loss)
            sums.append(m)
        return self.finish_mse_step(sum_dicts(sums), self.ema_decay_at(step))


# ------------------------------------------------------------------------------------------------------
class ConsistencyStage(ConsistencyMethod, Stage):
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
        self.init_grid()
        self.init_negative(trainer.encode_prompt(self.cfg.cd.negative_prompt))

    def engines(self):
        return {"model": self.engine}

    def generator_module(self):
        return self.engine.module

    @torch.no_grad()
    def cd_target(self, xt, tn, tp, text, mask):
        """The consistency target: the teacher's CFG Euler step t_n -> t_{n-1} (against the negative prompt),
        then the EMA target network's consistency function f(x, t) = x - t v(x, t) at t_{n-1}."""
        dt = next(self.teacher.parameters()).dtype
        x2, t2, text2, mask2 = self.teacher_inputs(xt, tn, text, mask)
        xp = self.teacher_step(xt, tn, tp, self.teacher(x2.to(dt), t2.to(dt), text2.to(dt), mask2))
        with self.engine.ema_weights():
            return self.consistency_fn(xp, tp, self.engine(xp, tp, text, mask))

    def train_step(self, step, micro_batches):
        sums = []
        for mb in micro_batches:
            text, mask = mb["text"], mb["text_mask"]
            xt, tn, tp = self.cd_point(mb, step)
            target = self.cd_target(xt, tn, tp, text, mask)
            loss, m = self.mse_loss(per_sample_mse(self.consistency_fn(xt, tn, self.engine(xt, tn, text, mask)), target),
                                    mb)
            self.engine.backward(loss)
            sums.append(m)
        return self.finish_mse_step(sum_dicts(sums), self.cfg.cd.ema_decay)


# ------------------------------------------------------------------------------------------------------
class APTStage(APTMethod, Stage):
    """Alternating D and G updates, aR1 on every D step, EMA of G."""

    name = "apt"

    def __init__(self, trainer):
        super().__init__(trainer)
        from megatron_apt.models.discriminator import Discriminator, OneStepGenerator

        self.init_apt()
        c = self.cfg
        G = OneStepGenerator(trainer.load_or_build_backbone(c.model.init, parallel=False))
        D = Discriminator(trainer.load_or_build_backbone(c.model.teacher, parallel=False), self.dcfg)
        D.init_heads(generator=torch.Generator().manual_seed(self.head_seed))
        trainer.parallelize(G)
        trainer.parallelize(D, extra_blocks=list(D.heads))
        self.G = trainer.make_engine(G, lr=c.optim.lr)
        self.D = trainer.make_engine(D, lr=c.optim.d_lr or c.optim.lr)
        self.G.init_ema()

    def engines(self):
        return {"G": self.G, "D": self.D}

    def generator_module(self):
        return self.G.module.backbone

    def _d_update(self, step, micro_batches, k):
        sums = []
        for mb in micro_batches:
            z, eps, t_real, t_fake = self.d_draws(mb, step, k)
            loss, m = discriminator_loss(self.D, self.G.raw, mb["x"], mb["text"], mb["text_mask"], cfg=self.apt, z=z,
                                         t_real=t_real, t_fake=t_fake, eps=eps, reduction="sum")
            self.D.backward(loss * self.scale(mb))
            sums.append(self.d_metric_sums(m, mb))
        return self.d_summary(sum_dicts(sums), self.D.step())

    def _g_update(self, step, micro_batches):
        D = self.D.module
        D.requires_grad_(False)
        tot, n = 0.0, 0.0
        try:
            for mb in micro_batches:
                x, text, mask = mb["x"], mb["text"], mb["text_mask"]
                z, t = self.g_draws(mb, step)
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


STAGE_CLASSES = {"flow": FlowMatchingStage, "cd": ConsistencyStage, "apt_image": APTStage, "apt_video": APTStage}

