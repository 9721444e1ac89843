"""The time model: model and hardware FLOPs of each pass, the hardware rate, communication, the update time (single stage and pipeline)."""

from __future__ import annotations

import re


from megatron_apt.config.model import MMDiTConfig
from megatron_apt.config.train import checkpointing
from megatron_apt.trainer.batching import BatchPlan
from megatron_apt.planning.inputs import MEASURED_CONFIG, OVERHEAD, PlanRequest, Sample, StepTime
from megatron_apt.planning.memory import _act_bytes, _packed_tokens, _Pass, pipeline_groups, stage_phases
from megatron_apt.planning.networks import NetCount


# ------------------------------------------------------------------------------------------------------
# step time
# ------------------------------------------------------------------------------------------------------
def _sum(ops, attr):
    return sum(getattr(o, attr) for o in ops)


def _comm_forwards(req: PlanRequest, p) -> tuple[float, float]:
    """(TP all-reduce, Ulysses all-to-all) forward passes' worth of block communication of pass p: 1, plus the
    recompute (a whole block again; with 'mlp' only the MLP's all-reduce, half of a block's, and no
    all-to-all, which the attention alone does; with 'attention' a whole block's, since the attention kernel's
    inputs and the projections around it are recomputed)."""
    scope = checkpointing(req.activation_checkpointing) if p.graph else False
    again = {"block": (1.0, 1.0), "attention": (1.0, 1.0), "mlp": (0.5, 0.0), False: (0.0, 0.0)}[scope]
    return 1 + again[0], 1 + again[1]


def _pass_ops(cfg: MMDiTConfig, sample: Sample, p: _Pass, dcfg):
    from megatron_apt.models.flops import discriminator_ops, mmdit_ops

    n = p.batch_factor
    if p.net == "D":
        return discriminator_ops(cfg, n, sample.n_visual, sample.n_text, dcfg, weights_grad=p.trains,
                                 input_grad=p.graph and not p.trains)
    return mmdit_ops(cfg, n, sample.n_visual, sample.n_text, weights_grad=p.trains)


def _ops_flops(req: PlanRequest, ops, p: _Pass) -> tuple[float, float]:
    model = _sum(ops, "forward") + (_sum(ops, "backward") if p.graph else 0)
    from megatron_apt.models.flops import recomputed_forward_flops

    recompute = recomputed_forward_flops(ops, req.activation_checkpointing) if p.graph else 0
    return float(model), float(recompute)


def pass_flops(req: PlanRequest, cfg: MMDiTConfig, sample: Sample, p: _Pass, dcfg) -> tuple[float, float]:
    """(model, recompute) FLOPs of pass p for one micro-batch sample (all of its batch_factor copies)."""
    return _ops_flops(req, _pass_ops(cfg, sample, p, dcfg), p)


_OP_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_OP_HEAD = re.compile(r"^heads\.(\d+)\.")


def stage_pass_flops(req: PlanRequest, cfg: MMDiTConfig, sample: Sample, p: _Pass, dcfg, ranges: list[range],
                     head_layers=()) -> list[tuple[float, float]]:
    """(model, recompute) FLOPs of pass p for one micro-batch sample on each pipeline stage: a block's ops on
    the stage that holds it, the embeddings on stage 0, the output head and D's logit on the last stage, a
    discriminator head on the stage of its tapped layer."""
    pp = len(ranges)
    where = {i: s for s, r in enumerate(ranges) for i in r}
    head_stage = {j: where[layer - 1] for j, layer in enumerate(head_layers)}
    per: list[list] = [[] for _ in range(pp)]
    for o in _pass_ops(cfg, sample, p, dcfg):
        m = _OP_BLOCK.match(o.name)
        h = _OP_HEAD.match(o.name)
        if m:
            s = where[int(m.group(1))]
        elif h:
            s = head_stage[int(h.group(1))]
        elif o.name in ("norm_out", "proj_out", "proj"):
            s = pp - 1
        else:  # embeddings, timestep and shared modulation
            s = 0
        per[s].append(o)
    return [_ops_flops(req, ops, p) for ops in per]


def hardware_rate(req: PlanRequest) -> float:
    """The measured model-FLOP rate as a hardware rate (recompute included), FLOP/s."""
    from megatron_apt.models.flops import apt_step_flops

    preset, lx, lt = MEASURED_CONFIG
    f = apt_step_flops(preset, 1, lx, lt, activation_checkpointing=True)
    return req.tflops * 1e12 * f.hardware / f.model


def plan_time(req: PlanRequest, cfg: MMDiTConfig, sample: Sample, nets: dict[str, NetCount], deepest: int,
              batch: BatchPlan, dcfg) -> StepTime:
    rate = hardware_rate(req)
    pb = 2 if req.precision == "bf16" else 4
    ab = _act_bytes(req)
    tp, sp = req.tp, req.sp
    zw = (req.world // (tp * sp)) * sp
    passes = [p for _, ps in stage_phases(req, cfg, deepest) for p in ps]
    slowest = max(range(batch.dp), key=lambda r: batch.counts[r])
    sizes = [b - a for a, b in batch.micro_batches(slowest)]
    sizes = [s if s > 0 else 1 for s in sizes]  # a weight-0 micro-step still runs one sample
    per_sample = {p.name: pass_flops(req, cfg, sample, p, dcfg) for p in passes}
    tokens_rank = sample.n_visual // sp + -(-sample.n_text // sp)
    compute = exposed = tpsp = 0.0
    rows = []
    for p in passes:
        model, rec = per_sample[p.name]
        c_tot = x_tot = t_tot = 0.0
        net = nets[p.net]
        traffic = 0.0
        if req.engine == "deepspeed" and p.zero and zw > 1:
            gathers = 2 if p.graph else 1
            traffic = (gathers + (1 if p.trains else 0)) * net.local * pb * (zw - 1) / zw
        for s in sizes:
            c = s * (model + rec) / (tp * sp) / rate
            z = traffic / (req.inter_node_gbps * 1e9)
            # tensor parallel: all-reduces of [tokens, D] per block (forward 2 per stream, recompute 2, backward 4)
            # Ulysses: all-to-alls of q, k, v and the output per block (forward, recompute, backward)
            unit = s * p.batch_factor * tokens_rank * cfg.hidden_size * ab
            n_fwd, n_fwd_a2a = _comm_forwards(req, p)
            t = 0.0
            if tp > 1:
                n_ar = 2 * n_fwd + (4 if p.graph else 0)
                t += p.layers * n_ar * unit * 2 * (tp - 1) / tp / (req.intra_node_gbps * 1e9)
            if sp > 1:
                n_a2a = 4 * (n_fwd_a2a + (1 if p.graph else 0))
                t += p.layers * n_a2a * unit / tp * (sp - 1) / sp / (req.intra_node_gbps * 1e9)
            c_tot += c
            x_tot += max(0.0, z - c)
            t_tot += t
        compute += c_tot
        exposed += x_tot
        tpsp += t_tot
        rows.append({"pass": p.name, "compute_s": c_tot, "zero_traffic_gb_per_micro_step": traffic / 1e9,
                     "exposed_zero_s": x_tot, "tp_sp_s": t_tot})
    base = compute + exposed + tpsp
    overhead = OVERHEAD * base
    model_ps = sum(m for m, _ in per_sample.values())
    hw_ps = sum(m + r for m, r in per_sample.values())
    return StepTime(base + overhead, compute, exposed, tpsp, overhead, len(sizes), max(batch.counts), model_ps, hw_ps,
                    rate / 1e12, rows, req.steps)


def pipeline_time(req: PlanRequest, cfg: MMDiTConfig, sample: Sample, stage_nets: list[dict[str, NetCount]],
                  blocks: list[dict[str, range]], head_layers: tuple, deepest: int, batch: BatchPlan,
                  dcfg) -> StepTime:
    """Update time under the pipeline engine: every pass one 1F1B call of (m + pp - 1) slots of the slowest
    stage (see the module docstring)."""
    rate = hardware_rate(req)
    ab = _act_bytes(req)
    tp, pp, dp = req.tp, req.pp, batch.dp
    inter, intra = req.inter_node_gbps * 1e9, req.intra_node_gbps * 1e9
    slowest_rank = max(range(dp), key=lambda r: batch.counts[r])
    sizes = [b - a for a, b in batch.micro_batches(slowest_rank)]
    sizes = [s if s > 0 else 1 for s in sizes]  # a weight-0 micro-step still runs one sample
    m = len(sizes)
    slots = sum(sizes) + (pp - 1) * max(sizes)  # samples' worth of slots in one call, the bubble included
    bubble_samples = (pp - 1) * max(sizes)
    tokens = sample.n_visual + sample.n_text
    latent = 1
    for d in sample.latent:
        latent *= d
    compute = tpsp = p2p = bubble = allreduce = broadcast = 0.0
    model_ps = hw_ps = 0.0
    rows = []
    for g in pipeline_groups(req, cfg, deepest):
        for p in g.passes:
            ranges = [blocks[s][p.net] for s in range(pp)]
            per_stage = stage_pass_flops(req, cfg, sample, p, dcfg, ranges, head_layers if p.net == "D" else ())
            mdl = sum(f for f, _ in per_stage)
            hw_ps += sum(f + r for f, r in per_stage)
            model_ps += 0.0 if p.extra else mdl
            # tensor parallel: all-reduces of [tokens, D] per block (forward 2 per stream, recompute 2, backward 4)
            unit = p.batch_factor * tokens * cfg.hidden_size * ab
            n_fwd, _ = _comm_forwards(req, p)
            n_ar = 2 * n_fwd + (4 if p.graph else 0)
            per = []
            for s in range(pp):
                c = sum(per_stage[s]) / tp / rate
                t = len(ranges[s]) * n_ar * unit * 2 * (tp - 1) / tp / intra if tp > 1 else 0.0
                per.append((c + t, s, c, t))
            _, slow, c1, t1 = max(per)
            x1 = 0.0
            if pp > 1:  # the activation forward, and its gradient back for a pass with a backward
                x1 = ((2 if p.graph else 1) * p.batch_factor * _packed_tokens(cfg, sample, p.net, len(head_layers))
                      * cfg.hidden_size * 4 / inter)
            compute += slots * c1
            tpsp += slots * t1
            p2p += slots * x1
            bubble += bubble_samples * (c1 + t1 + x1)
            rows.append({"pass": f"{g.name}: {p.name}", "slowest_stage": slow, "stage_s_per_sample": c1 + t1 + x1,
                         "compute_s": slots * c1, "p2p_s": slots * x1, "tp_sp_s": slots * t1,
                         "bubble_s": bubble_samples * (c1 + t1 + x1)})
        if pp > 1:
            p2p += g.moves * sum(sizes) * latent * 4 / inter
        if dp > 1:
            grads = max(n[g.trained].local - n[g.trained].unused for n in stage_nets)
            allreduce += 2 * grads * 4 * (dp - 1) / dp / inter
            if req.zero1:
                broadcast += max(n[g.trained].local for n in stage_nets) * 4 * (dp - 1) / dp / inter
    base = compute + tpsp + p2p + allreduce + broadcast
    overhead = OVERHEAD * base
    return StepTime(base + overhead, compute, 0.0, tpsp, overhead, m, max(batch.counts), model_ps, hw_ps,
                    rate / 1e12, rows, req.steps, pp=pp, bubble_fraction=(pp - 1) / (m + pp - 1), bubble_s=bubble,
                    p2p_s=p2p, dp_allreduce_s=allreduce, zero1_broadcast_s=broadcast)


# ------------------------------------------------------------------------------------------------------
# plan, search, format
