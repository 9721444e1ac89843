"""The plan as text: layout, batch arithmetic, memory table and time lines."""

from __future__ import annotations



from megatron_apt.config.train import checkpointing
from megatron_apt.trainer.batching import BatchPlan
from megatron_apt.planning.inputs import GIB, OVERHEAD, Plan


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _ckpt(ac) -> str:
    scope = checkpointing(ac)
    return {"block": "on", "mlp": "on (MLPs only)", "attention": "on (all but attention)", False: "off"}[scope]


def _gib(b: float) -> str:
    return f"{b / GIB:8.2f}"


def describe_layout(p: Plan) -> str:
    r = p.request
    engine = f" --engine {r.engine}" if r.engine == "pipeline" else ""
    return f"--tp {r.tp} --sp {r.sp} --pp {r.pp} --micro-batch {r.micro_batch}{engine}"


def config_overrides(p: Plan) -> str:
    """The layout as training-config overrides."""
    r = p.request
    out = f"parallel.tp={r.tp} parallel.sp={r.sp} parallel.pp={r.pp}"
    if r.engine == "pipeline":
        out += " parallel.engine=pipeline"
    return out + f" micro_batch={r.micro_batch}"


def batch_lines(b: BatchPlan) -> list[str]:
    hi, lo = max(b.counts), min(b.counts)
    n_hi = sum(1 for c in b.counts if c == hi)
    parts = [f"{n_hi} x {hi}"] + ([f"{b.dp - n_hi} x {lo}"] if lo != hi else [])
    lines = [f"{b.global_batch} = " + " + ".join(parts) + f" samples over {b.dp} data-parallel ranks (exact)"]
    for c in sorted(set(b.counts), reverse=True):
        full, rest = divmod(c, b.micro)
        mbs = ([f"{full} x {b.micro}"] if full else []) + ([f"1 x {rest}"] if rest else [])
        pad = b.micro_steps - full - (1 if rest else 0)
        lines.append(f"a rank with {_n(c, 'sample')}: micro-batches " + " + ".join(mbs)
                     + (f" + {pad} weight-0 step(s)" if pad else "")
                     + f" = {b.micro_steps} micro-step{'s' if b.micro_steps != 1 else ''}")
    lines.append(f"each micro-batch's summed loss is scaled by dp / N = {b.dp} / {b.global_batch}")
    return lines


def _stage_lines(p: Plan) -> list[str]:
    """The pipeline split and every stage's parameters and peak (the pipeline engine)."""
    r, cfg = p.request, p.request.model_config()
    last = r.pp - 1
    L = []
    splits = []
    for k in p.nets:
        counts = " + ".join(str(len(st.blocks[k])) for st in p.stages)
        ran = sum(len(st.blocks[k]) for st in p.stages)
        what = f"{k} {counts} blocks"
        if k == "D":
            carried = (f"{_n(cfg.num_layers - ran, 'unused block')} and the unused output head"
                       if cfg.num_layers > ran else "the unused output head")
            what += f" (cut after head layer {ran}, split evenly; stage {last} also carries {carried})"
        splits.append(what)
    L.append(f"  stages: {'; '.join(splits)}; embeddings on stage 0, output head on stage {last}")
    heavy = p.heaviest_stage
    for st in p.stages:
        params = ", ".join(f"{k} {n.local / 1e9:.2f} B" for k, n in st.nets.items())
        mark = "  <- heaviest" if st is heavy else ""
        L.append(f"          stage {st.index}: {params} params per GPU; peak {st.memory.total_bytes / GIB:.1f} GiB "
                 f"in '{st.memory.peak_phase.name}'{mark}")
    return L


def format_plan(p: Plan) -> str:
    r, m, t = p.request, p.memory, p.time
    cfg = r.model_config()
    pipe = r.engine == "pipeline"
    L = []
    L.append(f"plan: stage {r.stage}, preset {r.preset} on {_n(r.world, 'GPU')} of {r.gpu_mem_gib:.1f} GiB "
             f"({r.gpus_per_node} per node)")
    nets = ", ".join(f"{k} {n.total / 1e9:.2f} B params" + ("" if n.trainable else " (frozen)")
                     for k, n in p.nets.items())
    L.append(f"  model:  {nets}; {cfg.num_layers} blocks of {cfg.hidden_size}")
    L.append(f"  sample: {p.sample.describe()}")
    if r.engine == "deepspeed":
        zero = f"ZeRO-3 over dp x sp = {p.dims.dp * p.dims.sp} ranks"
    elif pipe:
        zero = (f"pipeline {_n(r.pp, 'stage')}, 1F1B, "
                + (f"ZeRO-1 optimizer state over dp = {p.dims.dp} ranks" if r.zero1 and p.dims.dp > 1
                   else "optimizer state whole (no ZeRO-1)"))
    else:
        zero = "plain torch engine (no sharding)"
    L.append(f"  layout: {p.dims.describe()}; {zero}; micro-batch {r.micro_batch}; "
             f"activation checkpointing {_ckpt(r.activation_checkpointing)}; {r.precision}")
    L.append("  batch:  " + batch_lines(p.batch)[0])
    for line in batch_lines(p.batch)[1:]:
        L.append("          " + line)
    if pipe:
        L.extend(_stage_lines(p))
        L.append(f"  memory per GPU on the heaviest stage (stage {p.heaviest_stage.index}) (GiB):")
    else:
        L.append("  memory per GPU (GiB):")
    for it in m.static:
        L.append(f"    {it.label:<50s}{_gib(it.bytes)}   {it.note}".rstrip())
    for ph in m.phases:
        mark = "  <- peak" if ph is m.peak_phase else ""
        L.append(f"    phase '{ph.name}'{mark}")
        for it in ph.items:
            if it.bytes:
                L.append(f"      {it.label:<48s}{_gib(it.bytes)}   {it.note}".rstrip())
        if ph.peak is not None:
            L.append(f"      {'= ' + ph.peak_note:<48s}{_gib(ph.peak)}")
    L.append(f"    {'allocator fragmentation (' + format(r.fragmentation, '.0%') + ' of the peak phase)':<50s}"
             f"{_gib(m.fragmentation_bytes)}")
    L.append(f"    {'runtime reserve (CUDA context, workspaces, NCCL)':<50s}{_gib(r.reserve_gib * GIB)}")
    L.append(f"    {'= peak estimate':<50s}{_gib(m.total_bytes)}   of {r.gpu_mem_gib:.1f} GiB -> "
             + ("fits" if p.fits else "DOES NOT FIT"))
    L.append("  step time (estimate):")
    L.append(f"    FLOPs per sample: {t.flops_model_per_sample / 1e15:.3f} PFLOP model, "
             f"{t.flops_hardware_per_sample / 1e15:.3f} PFLOP with recompute"
             + (" and the pipeline's extra G forward" if pipe and r.stage.startswith("apt") else ""))
    split = f"tp = {r.tp} GPU(s) per stage" if pipe else f"tp x sp = {r.tp * r.sp} GPU(s) per sample"
    L.append(f"    rate: {r.tflops:.0f} model TFLOP/s measured (2b APT step, one H200; assumed for H100) = "
             f"{t.hw_rate_tflops:.0f} hardware TFLOP/s per GPU, split over {split}")
    if pipe:
        mm = t.micro_steps
        L.append(f"    1F1B: each pass is one schedule call of m + pp - 1 = {mm} + {r.pp - 1} = {mm + r.pp - 1} slots "
                 f"of its slowest stage; bubble (pp - 1) / (m + pp - 1) = {t.bubble_fraction:.1%} of every call")
        for row in t.passes:
            L.append(f"      {row['pass']:<62s} stage {row['slowest_stage']}: {row['stage_s_per_sample']:6.3f} s per "
                     f"sample -> {row['compute_s'] + row['tp_sp_s'] + row['p2p_s']:7.1f} s")
        L.append(f"    slowest rank: {_n(t.samples_slowest_rank, 'sample')} in {_n(t.micro_steps, 'micro-step')}: "
                 f"compute {t.compute_s:.1f} s + TP collectives {t.tpsp_s:.1f} s + stage-to-stage p2p {t.p2p_s:.1f} s "
                 f"(bubble {t.bubble_s:.1f} s of these) + DP gradient all-reduce {t.dp_allreduce_s:.1f} s + "
                 f"ZeRO-1 broadcast {t.zero1_broadcast_s:.1f} s + {OVERHEAD:.0%} overhead {t.overhead_s:.1f} s")
    else:
        L.append(f"    slowest rank: {_n(t.samples_slowest_rank, 'sample')} in {_n(t.micro_steps, 'micro-step')}: "
                 f"compute {t.compute_s:.1f} s + ZeRO-3 traffic not hidden {t.exposed_zero_s:.1f} s + TP/SP "
                 f"collectives {t.tpsp_s:.1f} s + {OVERHEAD:.0%} overhead {t.overhead_s:.1f} s")
    L.append(f"    = {t.per_update_s:.1f} s per update"
             + (f"; {t.updates} updates = {t.total_hours:.1f} h on {_n(r.world, 'GPU')} "
                f"({t.total_hours * r.world:,.0f} GPU-hours)" if t.updates else ""))
    return "\n".join(L)
