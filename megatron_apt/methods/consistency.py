"""Discrete-time consistency distillation with the MSE loss (§3.2): the frozen diffusion teacher takes one
Euler step from t_n to t_{n-1} with a constant classifier-free guidance of 7.5 against a fixed negative
prompt (optionally only where t_n lies in `cd.guidance_interval`); the student's consistency function
f(x, t) = x - t v(x, t) at t_n is pulled to the EMA target network's at t_{n-1}. The product, G-hat, initialises the APT generator (Eq. 5)."""

from __future__ import annotations

import torch

from megatron_apt.methods.apt import shift_timestep
from megatron_apt.methods.base import Item, Method, bcast, per_sample_mse
from megatron_apt.models.conditioning import cfg_text_batch, guidance_scale, guided_velocity
from megatron_apt.parallel.execution import Frozen


class ConsistencyDistillation(Method):
    name = "cd"

    def __init__(self, ctx):
        super().__init__(ctx)
        c = self.cfg
        if not c.model.init and not c.model.teacher:
            raise ValueError("consistency distillation needs model.init (or model.teacher): the diffusion model")
        teacher_dir = c.model.teacher or c.model.init
        teacher = ctx.build("velocity", teacher_dir)
        if c.precision == "bf16" and ctx.device.type == "cuda":
            teacher = teacher.to(torch.bfloat16)
        self.teacher = Frozen(teacher)
        self.engine = ctx.engine(ctx.build("velocity", c.model.init or teacher_dir), lr=c.optim.lr)
        self.engine.init_ema()  # the target network
        grid = torch.linspace(0.0, 1.0, c.cd.num_steps + 1, dtype=torch.float64)
        self.grid = shift_timestep(grid, c.cd.shift).float()
        self.negative = ctx.encode_prompt(c.cd.negative_prompt)

    def engines(self):
        return {"model": self.engine}

    def cd_point(self, mb, step):
        """(x at t_n, t_n, t_{n-1}) of a micro-batch, n drawn per sample in 1..N."""
        x0, n_steps = mb["x"], self.cfg.cd.num_steps
        eps = self.noise(mb, step, "cd.eps")
        idx = (self.uniform(mb, step, "cd.n") * n_steps).long().clamp(0, n_steps - 1) + 1
        tn = self.grid.to(x0.device)[idx].to(x0.dtype)
        tp = self.grid.to(x0.device)[idx - 1].to(x0.dtype)
        return (1 - bcast(tn)) * x0 + bcast(tn) * eps, tn, tp

    def teacher_inputs(self, x, t, text, mask):
        """The conditional and the unconditional pass as one batch; the unconditional text is the encoded fixed
        negative prompt (§3.2), or the null text when `cd.negative_prompt` is empty."""
        text2, mask2 = cfg_text_batch(text, mask, self.negative)
        return torch.cat([x, x]), torch.cat([t, t]), text2, mask2

    def teacher_step(self, xt, tn, tp, v2):
        """The Euler step t_n -> t_{n-1} with the CFG velocity of the doubled teacher output v2."""
        # the doubled batch keeps one shape for every micro-batch (and every compiled graph): a sample outside
        # the guidance interval still gets its unconditional pass, then weight 0 (scale 1)
        vc, vu = v2.float().chunk(2)
        s = guidance_scale(self.cfg.cd.cfg_scale, tn.float(), tuple(self.cfg.cd.guidance_interval))
        v = guided_velocity(vc, vu, s)
        return (xt.float() + bcast(tp - tn).float() * v).to(xt.dtype)

    @staticmethod
    def consistency_fn(x, t, v):
        return x.float() - bcast(t).float() * v.float()

    def cd_targets(self, points, micro_batches):
        """The consistency targets of (x_t, t_n, t_{n-1}) per micro-batch: the teacher's CFG Euler step, then
        the EMA target network's f at t_{n-1}; where the model's output is (else None per micro-batch)."""
        ex = self.ex
        titems = [Item(*self.teacher_inputs(xt, tn, mb["text"], mb["text_mask"]), {})
                  for mb, (xt, tn, tp) in zip(micro_batches, points)]
        v2 = ex.forward(self.teacher, titems)
        xps = [self.teacher_step(xt, tn, tp, v) for (xt, tn, tp), v in zip(points, v2)] if ex.is_last else None
        xp_first = ex.last_to_first(xps, [p[0] for p in points])
        eitems = [Item(xp.to(xt.dtype), tp, mb["text"], mb["text_mask"], {})
                  for mb, (xt, tn, tp), xp in zip(micro_batches, points, xp_first)]
        with self.engine.ema_weights():
            ve = ex.forward(self.engine, eitems)
        if not ex.is_last:
            return [None] * len(points)
        return [self.consistency_fn(xp, tp, v) for (xt, tn, tp), xp, v in zip(points, xps, ve)]

    def train_step(self, step, micro_batches):
        points = [self.cd_point(mb, step) for mb in micro_batches]
        targets = self.cd_targets(points, micro_batches)
        items = [Item(xt, tn, mb["text"], mb["text_mask"], {"mb": mb, "xt": xt, "tn": tn, "target": target})
                 for mb, (xt, tn, tp), target in zip(micro_batches, points, targets)]

        def loss_fn(v, item):
            e = item.extra
            return self.mse_loss(per_sample_mse(self.consistency_fn(e["xt"], e["tn"], v), e["target"]), e["mb"])

        sums = self.ex.reduce(self.ex.forward_backward(self.engine, items, loss_fn), ("loss", "n"))
        return self.finish_mse_step(sums, self.cfg.cd.ema_decay)

    def model_flops(self, x_shape, text_len):
        from megatron_apt.models.flops import consistency_step_flops, visual_tokens

        cfg = self.engine.module.config
        return float(consistency_step_flops(cfg, 1, visual_tokens(cfg, x_shape[1:]), text_len).model)
