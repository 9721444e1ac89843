"""Flow-matching pretraining (the base diffusion model the paper post-trains; the toy teacher here):
x_t = (1 - t) x0 + t eps, target velocity v = eps - x0, shifted timesteps (Eq. 7's shift), caption dropout
for classifier-free guidance."""

from __future__ import annotations

import math

import torch

from megatron_apt.methods.apt import shift_timestep
from megatron_apt.methods.base import Item, Method, bcast, per_sample_mse
from megatron_apt.models.conditioning import null_text


class FlowMatching(Method):
    name = "flow"

    def __init__(self, ctx):
        super().__init__(ctx)
        # from scratch the whole model is initialised (identical weights on any layout) before it is cut
        self.engine = ctx.engine(ctx.build("velocity", self.cfg.model.init), lr=self.cfg.optim.lr)
        if self.cfg.apt.ema_decay > 0:
            self.engine.init_ema()

    def engines(self):
        return {"model": self.engine}

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
        return (1 - bcast(t)) * x0 + bcast(t) * eps, t, text, mask, eps - x0

    def ema_decay_at(self, step: int) -> float | None:
        """The EMA decay of update `step` (None without an EMA): from scratch the decay is ramped as
        min(decay, (1 + n) / (10 + n)) so that the random initialisation leaves the average."""
        if self.engine.ema is None:
            return None
        decay = self.cfg.apt.ema_decay
        return min(decay, (1.0 + step) / (10.0 + step)) if self.cfg.flow.ema_warmup else decay

    def train_step(self, step, micro_batches):
        items = []
        for mb in micro_batches:
            xt, t, text, mask, target = self.flow_inputs(mb, step)
            items.append(Item(xt, t, text, mask, {"target": target, "mb": mb}))

        def loss_fn(v, item):
            return self.mse_loss(per_sample_mse(v, item.extra["target"]), item.extra["mb"])

        sums = self.ex.reduce(self.ex.forward_backward(self.engine, items, loss_fn), ("loss", "n"))
        return self.finish_mse_step(sums, self.ema_decay_at(step))

    def model_flops(self, x_shape, text_len):
        from megatron_apt.models.flops import flow_matching_step_flops, visual_tokens

        cfg = self.engine.module.config
        return float(flow_matching_step_flops(cfg, 1, visual_tokens(cfg, x_shape[1:]), text_len).model)
