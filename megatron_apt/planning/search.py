"""Plans: one layout (`make_plan`), the candidate layouts (`candidates`, `search`), and a request from a training config."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_apt.config.model import DiscriminatorConfig, MMDiTConfig
from megatron_apt.parallel.state import ParallelDims
from megatron_apt.trainer.batching import BatchPlan, plan_batch
from megatron_apt.planning.inputs import LayoutError, Plan, PlanRequest, Sample, StagePlan, check_layout
from megatron_apt.planning.memory import _deepest, pipeline_memory, plan_memory
from megatron_apt.planning.networks import build_networks, count_network, zero1_shard
from megatron_apt.planning.time import pipeline_time, plan_time


# ------------------------------------------------------------------------------------------------------
_NET_CACHE: dict[Any, dict[str, torch.nn.Module]] = {}


def _modules(req: PlanRequest, cfg: MMDiTConfig):
    key = (req.stage, repr(cfg), req.head_layers)
    if key not in _NET_CACHE:
        dcfg = DiscriminatorConfig(head_layers=tuple(req.head_layers) if req.head_layers else None)
        _NET_CACHE[key] = build_networks(req.stage, cfg, dcfg)
    return _NET_CACHE[key]


_STAGE_CACHE: dict[Any, list[dict[str, torch.nn.Module]]] = {}


def _stage_modules(req: PlanRequest, cfg: MMDiTConfig) -> list[dict[str, torch.nn.Module]]:
    """Every pipeline stage's networks on the meta device, cut as the trainer cuts them (a fresh network per
    stage: make_pipeline_stage consumes the one it cuts)."""
    layers = tuple(int(n) for n in req.pipeline_layers) if req.pipeline_layers else None
    kind = "apt" if req.stage in ("apt_image", "apt_video") else req.stage  # the same networks
    key = (kind, repr(cfg), req.head_layers, req.pp, layers)
    if key not in _STAGE_CACHE:
        from megatron_apt.parallel.pipeline import make_pipeline_stage

        dcfg = DiscriminatorConfig(head_layers=tuple(req.head_layers) if req.head_layers else None)
        stages = []
        for s in range(req.pp):
            nets = build_networks(req.stage, cfg, dcfg)
            # the discriminator is always split evenly (Trainer.build_model: no pipeline_layers for D)
            stages.append({k: make_pipeline_stage(mod, s, req.pp, None if k == "D" else layers)
                           for k, mod in nets.items()})
        _STAGE_CACHE[key] = stages
    return _STAGE_CACHE[key]


def _make_pipeline_plan(req: PlanRequest, cfg: MMDiTConfig, sample: Sample, dims: ParallelDims,
                        batch: BatchPlan) -> Plan:
    mods = _modules(req, cfg)
    whole = {k: count_network(m, k, req.tp, 1, 0, trainable=(k != "teacher")) for k, m in mods.items()}
    deepest = _deepest(mods, cfg)
    head_layers = tuple(mods["D"].head_layers) if "D" in mods else ()
    dcfg = DiscriminatorConfig(head_layers=head_layers) if "D" in mods else None
    zdp = dims.dp if req.zero1 else 1
    stage_nets, blocks = [], []
    for st in _stage_modules(req, cfg):
        nets = {}
        for k, mod in st.items():
            c = count_network(mod, k, req.tp, 1, 0, trainable=(k != "teacher"))
            if c.trainable:
                c.zero1_shard = zero1_shard(mod, req.tp, zdp)
            nets[k] = c
        stage_nets.append(nets)
        blocks.append({k: range(mod.block_ids[0], mod.block_ids[-1] + 1) for k, mod in st.items()})
    mems = pipeline_memory(req, cfg, sample, stage_nets, blocks, deepest, req.micro_batch, batch.micro_steps,
                           head_layers)
    time = pipeline_time(req, cfg, sample, stage_nets, blocks, head_layers, deepest, batch, dcfg)
    stages = [StagePlan(s, blocks[s], stage_nets[s], mems[s]) for s in range(req.pp)]
    heaviest = max(stages, key=lambda s: s.memory.total_bytes)
    return Plan(req, dims, batch, sample, whole, heaviest.memory, time, stages)


def make_plan(req: PlanRequest) -> Plan:
    """Plan one layout (raises LayoutError for a layout that cannot run at all)."""
    cfg = req.model_config()
    sample = req.resolved_sample()
    dims = check_layout(req, cfg, sample)
    batch = plan_batch(req.global_batch, dims.dp, req.micro_batch)
    if req.engine == "pipeline":
        return _make_pipeline_plan(req, cfg, sample, dims, batch)
    mods = _modules(req, cfg)
    zw = dims.dp * dims.sp if req.engine == "deepspeed" else 1
    thr = req.persistence_threshold if req.engine == "deepspeed" else 0
    nets = {k: count_network(m, k, req.tp, zw if k != "teacher" else 1, thr, trainable=(k != "teacher"))
            for k, m in mods.items()}
    deepest = _deepest(mods, cfg)
    dcfg = DiscriminatorConfig(head_layers=tuple(mods["D"].head_layers)) if "D" in mods else None
    memory = plan_memory(req, cfg, sample, nets, deepest, req.micro_batch)
    time = plan_time(req, cfg, sample, nets, deepest, batch, dcfg)
    return Plan(req, dims, batch, sample, nets, memory, time)


NEAR_BEST = 0.02
"""Layouts within 2% of the fastest count as equally fast; among them the planner prefers less memory."""


def candidates(req: PlanRequest, tps=(1, 2, 4, 8), sps=(1, 2, 4, 8),
               micros=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), pps=(1,)) -> list[Plan]:
    """Every valid layout that fits: those within NEAR_BEST of the fastest first (least memory first), then
    the rest, fastest first. pp = 1 keeps the request's engine; pp > 1 (opt in, e.g. pps=(1, 2, 4, 8)) plans
    the pipeline engine (with sp = 1)."""
    out = []
    for pp in pps:
        engine = "pipeline" if pp > 1 else req.engine
        layers = req.pipeline_layers if (pp == req.pp and engine == req.engine) else None
        for tp in tps:
            for sp in sps:
                for mb in micros:
                    r = dataclasses.replace(req, tp=tp, sp=sp, pp=pp, engine=engine, pipeline_layers=layers,
                                            micro_batch=mb)
                    try:
                        p = make_plan(r)
                    except LayoutError:
                        continue
                    if mb > max(p.batch.counts) and mb != 1:
                        continue
                    if p.fits:
                        out.append(p)
    if not out:
        return out
    # layouts within NEAR_BEST of the fastest come first, least memory first (headroom costs nothing there)
    best = min(p.time.per_update_s for p in out)
    out.sort(key=lambda p: (p.time.per_update_s > best * (1 + NEAR_BEST), p.total_gib if
                            p.time.per_update_s <= best * (1 + NEAR_BEST) else p.time.per_update_s))
    return out


def search(req: PlanRequest, pps=(1,)) -> Plan | None:
    c = candidates(req, pps=pps)
    return c[0] if c else None


def request_from_config(cfg, world: int, **kw) -> PlanRequest:
    """A PlanRequest for a TrainConfig (megatron_apt.config.train) on `world` GPUs."""
    c = cfg
    ema = c.stage in ("apt_image", "apt_video", "cd") or c.apt.ema_decay > 0
    return PlanRequest(stage=c.stage, preset=c.model.preset, model_overrides=dict(c.model.overrides),
                       head_layers=tuple(c.model.head_layers) if c.model.head_layers else None, world=world,
                       tp=c.parallel.tp, sp=c.parallel.sp, pp=c.parallel.pp,
                       pipeline_layers=tuple(c.parallel.pipeline_layers) if c.parallel.pipeline_layers else None,
                       zero1=c.parallel.zero1, micro_batch=c.micro_batch, global_batch=c.global_batch,
                       steps=c.steps, activation_checkpointing=c.parallel.recompute,
                       precision=c.precision, engine=c.parallel.engine, zero_stage=c.parallel.zero_stage,
                       persistence_threshold=c.parallel.zero_persistence_threshold, optimizer=c.optim.optimizer,
                       ema=ema, use_r1=c.apt.use_r1, **kw)


