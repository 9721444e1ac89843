"""Adversarial post-training (§3.3-3.5): G(z, c) = z - G-hat(z, c, T) starts from the consistency-distilled
G-hat (Eq. 5), D from the original diffusion weights plus cross-attention heads (§3.3, Fig. 1); they are
updated in alternating steps, D with the non-saturating loss and the approximated R1 (Eq. 10) on every step,
G with the non-saturating loss through D (Eq. 2); G keeps an EMA (§3.5). The losses are in `methods.apt`."""

from __future__ import annotations

import torch.nn.functional as F

from megatron_apt.config.model import DiscriminatorConfig
from megatron_apt.methods.apt import (
    APTConfig,
    discriminator_loss_from_logits,
    fused_d_inputs,
    perturb,
    shift_timestep,
    split_fused_logits,
)
from megatron_apt.methods.base import Item, Method

HEAD_SEED_OFFSET = 17  # D's fresh heads are drawn from torch.Generator().manual_seed(seed + 17)


class AdversarialPostTraining(Method):
    name = "apt"
    D_SUM_KEYS = ("d_adv", "ar1")  # summed over samples by the loss (reduction 'sum')
    D_MEAN_KEYS = ("logit_real", "logit_fake", "d_acc")  # per micro-batch means, weighted by its samples

    def __init__(self, ctx):
        super().__init__(ctx)
        c = self.cfg
        if not c.model.init or not c.model.teacher:
            raise ValueError("APT needs model.init (the consistency-distilled G-hat, or the image stage's EMA "
                             "generator) and model.teacher (the diffusion weights for the discriminator)")
        self.apt = APTConfig(r1_lambda=c.apt.r1_lambda, r1_sigma=c.apt.r1_sigma, r1_sigma_means=c.apt.r1_sigma_means,
                             timestep_shift=c.apt.timestep_shift, use_r1=c.apt.use_r1)
        self.dcfg = DiscriminatorConfig(head_layers=tuple(c.model.head_layers) if c.model.head_layers else None)
        self.head_seed = c.seed + HEAD_SEED_OFFSET
        self.G = ctx.engine(ctx.build("generator", c.model.init), lr=c.optim.lr)
        self.D = ctx.engine(ctx.build("discriminator", c.model.teacher, dcfg=self.dcfg, head_seed=self.head_seed),
                            lr=c.optim.d_lr or c.optim.lr)
        self.G.init_ema()

    def engines(self):
        return {"G": self.G, "D": self.D}

    # ---- per-sample draws ----
    def d_draws(self, mb, step, k):
        """(z, eps, t_real, t_fake) of the k-th discriminator update (Eqs. 6-7: one t per sample)."""
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

    # ---- the updates ----
    def train_step(self, step, micro_batches):
        out: dict[str, float] = {}
        for k in range(self.cfg.apt.d_steps_per_g_step):
            out.update(self._d_update(step, micro_batches, k))
        out.update(self._g_update(step, micro_batches))
        out["loss"] = out["g_loss"]
        return out

    def _d_update(self, step, micro_batches, k):
        """Eq. 10 on [real, perturbed real, fake] as one D batch; G runs forward only."""
        draws = [self.d_draws(mb, step, k) for mb in micro_batches]
        gitems = [Item(z, None, mb["text"], mb["text_mask"], {}) for mb, (z, *_rest) in zip(micro_batches, draws)]
        fakes = self.ex.last_to_first(self.ex.forward(self.G, gitems), [d[0] for d in draws])
        use_r1 = self.apt.use_r1
        items = []
        for mb, (z, eps, t_real, t_fake), fake in zip(micro_batches, draws, fakes):
            x = mb["x"]
            xin, tin, text, mask, _ = fused_d_inputs(x, perturb(x, eps, self.apt), fake.detach().to(x.dtype), t_real,
                                                     t_fake, mb["text"], mb["text_mask"], use_r1=use_r1)
            items.append(Item(xin, tin, text, mask, {"mb": mb}))

        def loss_fn(logits, item):
            mb = item.extra["mb"]
            real_l, pert_l, fake_l = split_fused_logits(logits.float(), mb["x"].shape[0], use_r1=use_r1)
            loss, m = discriminator_loss_from_logits(real_l, fake_l, pert_l, cfg=self.apt, reduction="sum")
            return loss * self.scale(mb), self.d_metric_sums(m, mb)

        keys = self.D_SUM_KEYS + self.D_MEAN_KEYS + ("n",)
        sums = self.ex.reduce(self.ex.forward_backward(self.D, items, loss_fn), keys)
        return self.d_summary(sums, self.D.step())

    def _g_update(self, step, micro_batches):
        """Eq. 2, non-saturating, through the frozen D into G; then G's EMA."""
        draws = [self.g_draws(mb, step) for mb in micro_batches]
        items = [Item(z, None, mb["text"], mb["text_mask"], {"mb": mb, "t": t})
                 for mb, (z, t) in zip(micro_batches, draws)]

        def d_item(fake, item):
            mb = item.extra["mb"]
            x = mb["x"]
            return Item(fake.to(x.dtype), item.extra["t"].to(x.dtype), mb["text"], mb["text_mask"], {"mb": mb})

        def loss_fn(logits, item):
            mb = item.extra["mb"]
            loss = F.softplus(-logits.float()).sum()
            return loss * self.scale(mb), {"g_loss": float(loss.detach()) * mb["weight"],
                                           "n": mb["weight"] * mb["x"].shape[0]}

        D = self.D.module
        D.requires_grad_(False)
        try:
            sums = self.ex.reduce(self.ex.forward_backward_through(self.G, self.D, items, d_item, loss_fn),
                                  ("g_loss", "n"))
        finally:
            D.requires_grad_(True)
        gnorm = self.G.step()
        self.G.update_ema(self.cfg.apt.ema_decay)
        return {"g_loss": self.ctx.global_mean(sums["g_loss"], sums["n"]), "g_grad_norm": gnorm}

    # ---- metrics ----
    def d_metric_sums(self, m, mb) -> dict[str, float]:
        """One micro-batch's contribution to the discriminator metrics (m: discriminator_loss_from_logits's)."""
        w = mb["weight"] * mb["x"].shape[0]
        out = {k: float(m[k]) * mb["weight"] for k in self.D_SUM_KEYS}
        out.update({k: float(m[k]) * w for k in self.D_MEAN_KEYS})
        out["n"] = w
        return out

    def d_summary(self, sums: dict[str, float], gnorm: float) -> dict[str, float]:
        out = {k: self.ctx.global_mean(sums.get(k, 0.0), sums.get("n", 0.0))
               for k in self.D_SUM_KEYS + self.D_MEAN_KEYS}
        out["d_loss"] = out["d_adv"] + (self.apt.r1_lambda * out["ar1"] if self.apt.use_r1 else 0.0)
        out["logit_gap"] = out["logit_real"] - out["logit_fake"]
        out["d_grad_norm"] = gnorm
        return out

    def model_flops(self, x_shape, text_len):
        from megatron_apt.models.flops import apt_step_flops, visual_tokens

        cfg = self.G.module.config
        return float(apt_step_flops(cfg, 1, visual_tokens(cfg, x_shape[1:]), text_len, self.dcfg,
                                    use_r1=self.apt.use_r1).model)
