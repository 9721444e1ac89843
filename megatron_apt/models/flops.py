"""Analytic model-FLOP counts for the MMDiT, the APT discriminator and the training steps of each stage.

Conventions (the usual ones for MFU):

* A matrix product of [m, k] by [k, n] costs 2 m n k FLOPs. Every `nn.Linear` of the model is counted:
  patch / text / timestep / pooled embeddings, the adaLN modulation Linears (shared or per block), the
  attention projections, the MLPs and the output head.
* Attention forward costs 4 B H Lq Lk Dh (q k^T and p v); its backward 2x that (dP, dV, dQ, dK), the
  count that flash-style kernels and `torch.utils.flop_counter` both use.
* Normalisations, rotary embeddings, softmax, activations and other element-wise work are not counted
  (they are not "model FLOPs"; on an H100/H200 they cost time but little arithmetic).
* A context-pre-only last block (SD3) computes no text queries, no text attention outputs (Lq = visual
  tokens only), no text output projection and no text MLP.
* `features_at` (the discriminator) stops after the deepest tapped layer and skips the output head.

Backward passes are counted Linear by Linear: a Linear costs one more product for its weight gradient
(when the weights train) and one for its input gradient (when its input depends on something that needs a
gradient). So a fully trained model's backward is slightly under 2x its forward (the first layers need no
input gradient), and a frozen discriminator that passes gradients to its input (the generator's APT step)
costs its Linear forward once plus its attention twice: attention's backward always forms dQ, dK and dV.

"Model" FLOPs count each pass once; "hardware" FLOPs add the forward recomputation of activation
checkpointing (every block of every pass that keeps a graph). MFU uses model FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megatron_apt.config.model import DiscriminatorConfig, MMDiTConfig, get_model_config
from megatron_apt.config.train import checkpointing

# ------------------------------------------------------------------------------------------------------
# peak figures
# ------------------------------------------------------------------------------------------------------
# Datasheet dense BF16 tensor-core throughput (no sparsity), FLOP/s. Matched against the CUDA device name
# in this order (first substring match wins).
DATASHEET_BF16_DENSE: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)
H100_SXM_BF16_DENSE = 989e12
"""The H100 / H200 SXM datasheet figure every MFU in this project is reported against."""
MEASURED_H200_BF16 = 800e12
"""Dense bf16 matmul (8192^3) measured on one H200 with torch 2.11: a reachable ceiling."""


def peak_flops(device: Any = None) -> float | None:
    """Datasheet dense bf16 FLOP/s of a CUDA device (a torch.device, an index, a name string, or None for
    the current device); None for CPUs and unknown devices."""
    name = None
    if isinstance(device, str) and not device.startswith(("cuda", "cpu", "meta")):
        name = device
    else:
        try:
            import torch

            dev = torch.device(device) if device is not None else None
            if dev is not None and dev.type != "cuda":
                return None
            if not torch.cuda.is_available():
                return None
            name = torch.cuda.get_device_name(dev)
        except (RuntimeError, AssertionError, ValueError):
            return None
    upper = name.upper()
    for key, value in DATASHEET_BF16_DENSE:
        if key in upper:
            return value
    return None


def mfu(achieved_flops_per_s: float, peak: float) -> float:
    """Model FLOP utilisation: achieved / peak (a fraction, not a percentage)."""
    if not peak > 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak}")
    return achieved_flops_per_s / peak


def mfu_report(flops: float, seconds: float, device: Any = None, *, peak: float | None = None,
               measured_peak: float = MEASURED_H200_BF16, num_gpus: int = 1) -> dict[str, Any]:
    """Achieved TFLOP/s and MFU for `flops` of work done in `seconds` by `num_gpus` devices.

    `peak` overrides the datasheet figure; without one the device's datasheet figure is used, and for an
    unrecognised device (or a CPU) the H100/H200 SXM figure, flagged as assumed."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if peak is not None:
        source = "given"
    else:
        peak = peak_flops(device)
        source = "datasheet"
        if peak is None:
            peak, source = H100_SXM_BF16_DENSE, "assumed H100/H200 SXM (device not recognised)"
    per_gpu = flops / seconds / num_gpus
    return {
        "tflops_per_s": flops / seconds / 1e12,
        "tflops_per_s_per_gpu": per_gpu / 1e12,
        "peak_tflops_datasheet": peak / 1e12,
        "peak_source": source,
        "peak_tflops_measured": measured_peak / 1e12,
        "mfu_datasheet": mfu(per_gpu, peak),
        "mfu_measured": mfu(per_gpu, measured_peak),
    }


# ------------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------------
def _cfg(cfg: str | MMDiTConfig | dict) -> MMDiTConfig:
    return cfg if isinstance(cfg, MMDiTConfig) else get_model_config(cfg)


def visual_tokens(cfg: str | MMDiTConfig | dict, latent_thw: tuple[int, int, int]) -> int:
    """Visual tokens of a latent of T x H x W (T = 1 for images) after patching."""
    cfg = _cfg(cfg)
    T, H, W = latent_thw
    pt, ph, pw = cfg.patch_size
    if T % pt or H % ph or W % pw:
        raise ValueError(f"latent {T}x{H}x{W} is not divisible by the patch size {pt}x{ph}x{pw}")
    return (T // pt) * (H // ph) * (W // pw)


# ------------------------------------------------------------------------------------------------------
# per-op accounting
# ------------------------------------------------------------------------------------------------------
@dataclass
class OpCount:
    """One matrix-product-shaped op: its forward FLOPs and its backward FLOPs in a given grad setting."""

    name: str
    forward: int
    backward: int
    kind: str  # 'linear' | 'attention'
    in_blocks: bool  # inside a transformer block (recomputed under activation checkpointing)


def _linear(name, m, k, n, weight_grad, input_grad, in_blocks=False):
    f = 2 * m * k * n
    return OpCount(name, f, f * (int(weight_grad) + int(input_grad)), "linear", in_blocks)


def _attention(name, B, heads, lq, lk, dh, needs_grad, in_blocks=False):
    f = 4 * B * heads * lq * lk * dh
    return OpCount(name, f, 2 * f if needs_grad else 0, "attention", in_blocks)


def mmdit_ops(cfg: str | MMDiTConfig | dict, batch: int, n_visual: int, n_text: int,
              upto_layer: int | None = None, *, weights_grad: bool = False,
              input_grad: bool = False) -> list[OpCount]:
    """Every counted op of one MMDiT forward (and its backward) over `batch` samples.

    `upto_layer` (1-based) stops after that block and skips the output head, as `features_at` does.
    `weights_grad`: the parameters train; `input_grad`: the latent input needs a gradient (a frozen
    discriminator passing gradients to the generator)."""
    cfg = _cfg(cfg)
    B, Lx, Lc = int(batch), int(n_visual), int(n_text)
    D, H, Dh, M = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_hidden
    n_layers = cfg.num_layers
    if upto_layer is not None and not 1 <= upto_layer <= n_layers:
        raise ValueError(f"upto_layer {upto_layer} is outside 1..{n_layers}")
    wg = bool(weights_grad)
    ops: list[OpCount] = []
    # embeddings: the raw inputs (latent patches, text states, timestep features, pooled text) need an input
    # gradient only for the latent, and only when asked
    ops.append(_linear("patch_embed", B * Lx, cfg.patch_dim_in, D, wg, input_grad))
    ops.append(_linear("t_embed.linear_1", B, cfg.timestep_freq_dim, D, wg, False))
    ops.append(_linear("t_embed.linear_2", B, D, D, wg, wg))
    if cfg.pooled_dim > 0:
        ops.append(_linear("pooled_embed.linear_1", B, cfg.pooled_dim, D, wg, False))
        ops.append(_linear("pooled_embed.linear_2", B, D, D, wg, wg))
    ops.append(_linear("text_embed", B * Lc, cfg.text_dim, D, wg, False))
    temb_rg = wg  # SiLU(temb) needs a gradient only when the embedders train
    if cfg.adaln == "shared":
        ops.append(_linear("x_mod", B, D, 6 * D, wg, temb_rg))
        ops.append(_linear("c_mod", B, D, 6 * D, wg, temb_rg))
    x_rg = wg or bool(input_grad)  # visual stream needs a gradient
    c_rg = wg  # text stream
    last = n_layers if upto_layer is None else upto_layer
    for i in range(last):
        p = f"blocks.{i}."
        cpo = cfg.last_block_context_pre_only and i == n_layers - 1
        n_c_mod = 2 if cpo else 6
        if cfg.adaln == "per_block":
            ops.append(_linear(p + "x_mod", B, D, 6 * D, wg, temb_rg, True))
            ops.append(_linear(p + "c_mod", B, D, n_c_mod * D, wg, temb_rg, True))
        nx_rg, nc_rg = x_rg or wg, c_rg or wg  # modulated, normed streams
        for n in ("x_q", "x_k", "x_v"):
            ops.append(_linear(p + "attn." + n, B * Lx, D, D, wg, nx_rg, True))
        names = ("c_k", "c_v") if cpo else ("c_q", "c_k", "c_v")
        for n in names:
            ops.append(_linear(p + "attn." + n, B * Lc, D, D, wg, nc_rg, True))
        attn_rg = nx_rg or nc_rg
        lq = Lx if cpo else Lx + Lc
        ops.append(_attention(p + "attn.core", B, H, lq, Lx + Lc, Dh, attn_rg, True))
        ops.append(_linear(p + "attn.x_out", B * Lx, D, D, wg, attn_rg, True))
        x_rg = x_rg or attn_rg
        ops.append(_linear(p + "x_mlp.fc1", B * Lx, D, M, wg, x_rg or wg, True))
        ops.append(_linear(p + "x_mlp.fc2", B * Lx, M, D, wg, x_rg or wg, True))
        if not cpo:
            ops.append(_linear(p + "attn.c_out", B * Lc, D, D, wg, attn_rg, True))
            c_rg = c_rg or attn_rg
            ops.append(_linear(p + "c_mlp.fc1", B * Lc, D, M, wg, c_rg or wg, True))
            ops.append(_linear(p + "c_mlp.fc2", B * Lc, M, D, wg, c_rg or wg, True))
    if upto_layer is None:
        ops.append(_linear("norm_out", B, D, 2 * D, wg, temb_rg))
        ops.append(_linear("proj_out", B * Lx, D, cfg.patch_dim_out, wg, x_rg or wg))
    return ops


def head_ops(cfg: str | MMDiTConfig | dict, batch: int, n_visual: int, dcfg: DiscriminatorConfig | None = None,
             *, weights_grad: bool = False, input_grad: bool = False) -> list[OpCount]:
    """The discriminator's cross-attention heads and its final projection."""
    cfg = _cfg(cfg)
    dcfg = dcfg or DiscriminatorConfig()
    B, Lx, D, H, Dh = int(batch), int(n_visual), cfg.hidden_size, cfg.num_heads, cfg.head_dim
    M = int(D * dcfg.head_mlp_ratio)
    layers = dcfg.resolve_layers(cfg.num_layers)
    wg, tok_rg = bool(weights_grad), bool(weights_grad or input_grad)
    ops = []
    for j, _layer in enumerate(layers):
        p = f"heads.{j}."
        # the learnable query token: a [B, 1, D] row through to_q
        ops.append(_linear(p + "to_q", B, D, D, wg, wg))
        ops.append(_linear(p + "to_k", B * Lx, D, D, wg, tok_rg))
        ops.append(_linear(p + "to_v", B * Lx, D, D, wg, tok_rg))
        # one query row: q k^T then p v as batched products; backward forms a gradient only for operands that
        # need one (the query needs none when the heads are frozen), unlike the fused backbone kernels
        f = 4 * B * H * Lx * Dh
        q_rg, k_rg, v_rg = wg, tok_rg, tok_rg
        p_rg = q_rg or k_rg
        b = f // 2 * (int(q_rg) + int(k_rg)) + f // 2 * (int(p_rg) + int(v_rg))
        ops.append(OpCount(p + "core", f, b, "attention", False))
        ops.append(_linear(p + "to_out", B, D, D, wg, tok_rg))
        ops.append(_linear(p + "mlp.fc1", B, D, M, wg, tok_rg))
        ops.append(_linear(p + "mlp.fc2", B, M, D, wg, tok_rg))
    ops.append(_linear("proj", B, D * len(layers), 1, wg, tok_rg))
    return ops


def discriminator_ops(cfg, batch, n_visual, n_text, dcfg: DiscriminatorConfig | None = None, *,
                      weights_grad: bool = False, input_grad: bool = False) -> list[OpCount]:
    """Backbone up to the deepest head layer (no output head) plus the heads."""
    cfg = _cfg(cfg)
    dcfg = dcfg or DiscriminatorConfig()
    deepest = max(dcfg.resolve_layers(cfg.num_layers))
    return (mmdit_ops(cfg, batch, n_visual, n_text, upto_layer=deepest, weights_grad=weights_grad,
                      input_grad=input_grad)
            + head_ops(cfg, batch, n_visual, dcfg, weights_grad=weights_grad, input_grad=input_grad))


def _fwd(ops):
    return sum(o.forward for o in ops)


def _bwd(ops):
    return sum(o.backward for o in ops)


def _blocks_fwd(ops):
    return sum(o.forward for o in ops if o.in_blocks)


def recomputed_forward_flops(ops, activation_checkpointing) -> int:
    """Forward FLOPs run again in the backward pass: every block's (scope 'block', or True), only the blocks'
    MLPs ('mlp'), the blocks' but their attention cores ('attention'), none (False)."""
    scope = checkpointing(activation_checkpointing)
    if not scope:
        return 0
    if scope == "mlp":
        return sum(o.forward for o in ops if o.in_blocks and "_mlp." in o.name)
    if scope == "attention":
        return sum(o.forward for o in ops if o.in_blocks and o.kind != "attention")
    return _blocks_fwd(ops)


def mmdit_forward_flops(cfg, batch: int, n_visual: int, n_text: int, upto_layer: int | None = None,
                        *, breakdown: bool = False):
    """FLOPs of one MMDiT forward; with breakdown a dict {embed, blocks (linear), attention, head, total}."""
    ops = mmdit_ops(cfg, batch, n_visual, n_text, upto_layer)
    total = _fwd(ops)
    if not breakdown:
        return total
    attn = sum(o.forward for o in ops if o.kind == "attention")
    blocks_linear = sum(o.forward for o in ops if o.in_blocks and o.kind == "linear")
    head = sum(o.forward for o in ops if o.name in ("norm_out", "proj_out"))
    return {"embed": total - attn - blocks_linear - head, "blocks_linear": blocks_linear, "attention": attn,
            "head": head, "total": total}


def mmdit_backward_flops(cfg, batch, n_visual, n_text, upto_layer=None, *, weights_grad=True, input_grad=False):
    return _bwd(mmdit_ops(cfg, batch, n_visual, n_text, upto_layer, weights_grad=weights_grad,
                          input_grad=input_grad))


def discriminator_forward_flops(cfg, batch: int, n_visual: int, n_text: int,
                                dcfg: DiscriminatorConfig | None = None) -> int:
    """FLOPs of one discriminator forward (backbone to the deepest tapped layer + cross-attention heads)."""
    return _fwd(discriminator_ops(cfg, batch, n_visual, n_text, dcfg))


def discriminator_backward_flops(cfg, batch, n_visual, n_text, dcfg=None, *, weights_grad=True, input_grad=False):
    return _bwd(discriminator_ops(cfg, batch, n_visual, n_text, dcfg, weights_grad=weights_grad,
                                  input_grad=input_grad))


# ------------------------------------------------------------------------------------------------------
# training steps
# ------------------------------------------------------------------------------------------------------
@dataclass
class StepFlops:
    """FLOPs of one training step over one micro-batch: `model` counts each pass once (MFU), `hardware`
    adds activation-checkpointing recomputation, `parts` names every pass."""

    model: int
    hardware: int
    parts: dict[str, int] = field(default_factory=dict)
    recompute: int = 0
    forward_equivalents: float = 0.0
    """model / (one forward of the trained network): 3 for flow matching, about 15 for APT."""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "hardware": self.hardware, "recompute": self.recompute,
                "forward_equivalents": self.forward_equivalents, "parts": dict(self.parts)}


def _finish(parts: dict[str, int], recompute: int, unit: int) -> StepFlops:
    model = sum(parts.values())
    return StepFlops(model=model, hardware=model + recompute, parts=parts, recompute=recompute,
                     forward_equivalents=model / unit if unit else math.nan)


def flow_matching_step_flops(cfg, batch: int, n_visual: int, n_text: int, *,
                             activation_checkpointing: bool | str = True) -> StepFlops:
    """Flow-matching pre-training: one forward and one backward (about 3 forwards)."""
    ops = mmdit_ops(cfg, batch, n_visual, n_text, weights_grad=True)
    parts = {"forward": _fwd(ops), "backward": _bwd(ops)}
    return _finish(parts, recomputed_forward_flops(ops, activation_checkpointing), _fwd(ops))


def apt_step_flops(cfg, batch: int, n_visual: int, n_text: int, dcfg: DiscriminatorConfig | None = None, *,
                   use_r1: bool = True, activation_checkpointing: bool | str = True) -> StepFlops:
    """One generator update plus one discriminator update on a micro-batch of `batch` samples:

    G step: G forward + backward (~3 F_G), D forward on the fakes and backward to its input with D frozen
    (F_D + the input-gradient backward: Linears once, attention twice);
    D step: G forward under no_grad (F_G), D forward on real, perturbed real and fake (3 F_D; 2 without
    aR1) and D backward with weight gradients (~2 x 3 F_D)."""
    cfg = _cfg(cfg)
    n_d = 3 if use_r1 else 2
    g = mmdit_ops(cfg, batch, n_visual, n_text, weights_grad=True)
    d_frozen = discriminator_ops(cfg, batch, n_visual, n_text, dcfg, input_grad=True)
    d_train = discriminator_ops(cfg, n_d * batch, n_visual, n_text, dcfg, weights_grad=True)
    g_fwd = _fwd(g)
    parts = {
        "g_step.G_forward": g_fwd,
        "g_step.G_backward": _bwd(g),
        "g_step.D_forward_fake": _fwd(d_frozen),
        "g_step.D_backward_input_only": _bwd(d_frozen),
        "d_step.G_forward_no_grad": g_fwd,
        f"d_step.D_forward_x{n_d}": _fwd(d_train),
        f"d_step.D_backward_x{n_d}": _bwd(d_train),
    }
    # every pass that keeps a graph recomputes its blocks (or their MLPs)
    recompute = sum(recomputed_forward_flops(ops, activation_checkpointing) for ops in (g, d_frozen, d_train))
    return _finish(parts, recompute, g_fwd)


def consistency_step_flops(cfg, batch: int, n_visual: int, n_text: int, *, guidance: bool = True,
                           ema_target: bool = True, activation_checkpointing: bool | str = True) -> StepFlops:
    """Discrete-time consistency distillation: student forward + backward, the teacher's Euler step under
    classifier-free guidance (a conditional and an unconditional forward), the EMA target's forward."""
    s = mmdit_ops(cfg, batch, n_visual, n_text, weights_grad=True)
    f = _fwd(s)
    parts = {"student_forward": f, "student_backward": _bwd(s),
             "teacher_forward_" + ("cond_uncond" if guidance else "cond"): f * (2 if guidance else 1)}
    if ema_target:
        parts["ema_target_forward"] = f
    return _finish(parts, recomputed_forward_flops(s, activation_checkpointing), f)


STAGES = {"flow": flow_matching_step_flops, "apt": apt_step_flops, "cd": consistency_step_flops}


# ------------------------------------------------------------------------------------------------------
# the text encoder
# ------------------------------------------------------------------------------------------------------
def t5_encoder_forward_flops(batch: int, seq_len: int, d_model: int, num_layers: int, num_heads: int, d_kv: int,
                             d_ff: int, gated: bool = True) -> int:
    """A T5 / UMT5 encoder forward: q, k, v, o projections, attention, the (gated) feed-forward.
    The embedding lookup is no matrix product and is not counted."""
    inner = num_heads * d_kv
    tokens = batch * seq_len
    proj = 4 * 2 * tokens * d_model * inner
    attn = 4 * batch * num_heads * seq_len * seq_len * d_kv
    ffn = (3 if gated else 2) * 2 * tokens * d_model * d_ff
    return num_layers * (proj + attn + ffn)


__all__ = [
    "DATASHEET_BF16_DENSE", "H100_SXM_BF16_DENSE", "MEASURED_H200_BF16", "STAGES", "OpCount", "StepFlops",
    "apt_step_flops", "consistency_step_flops", "discriminator_backward_flops", "discriminator_forward_flops",
    "discriminator_ops", "flow_matching_step_flops", "head_ops", "mfu", "mfu_report", "mmdit_backward_flops",
    "mmdit_forward_flops", "mmdit_ops", "peak_flops", "t5_encoder_forward_flops", "visual_tokens",
]
