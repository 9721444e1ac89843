"""The memory model: the passes of one update, their activations, and the peak per GPU (single stage and pipeline)."""

from __future__ import annotations

from dataclasses import dataclass


from megatron_apt.config.model import MMDiTConfig
from megatron_apt.config.train import checkpointing
from megatron_apt.planning.inputs import (
    ACT_REPLICATED, ACT_TP, DS_MAX_LIVE_PARAMETERS, DS_REDUCE_BUCKET_SIZE, DS_SUB_GROUP_SIZE, GIB, MLP_HIDDEN_TP,
    NOGRAD_REPLICATED, NOGRAD_TP, OPTIMIZER_STATE_NAMES, OPTIMIZER_STATES, OUTSIDE_BLOCKS, TRANSIENT_REPLICATED,
    TRANSIENT_TP, WORKING_SET_BLOCKS, Item, Memory, Phase, PlanRequest, Sample,
)
from megatron_apt.planning.networks import NetCount


def _act_bytes(req: PlanRequest) -> int:
    return 2 if req.precision == "bf16" else 4


def _ckpt_desc(req: PlanRequest) -> str:
    return {"block": "inputs of every block", "mlp": "every block's activations but its MLP hidden",
            "attention": "inputs and attention outputs of every block",
            False: "every block's activations"}[checkpointing(req.activation_checkpointing)]


def _deepest(nets_modules, cfg) -> int:
    D = nets_modules.get("D")
    return max(D.head_layers) if D is not None else cfg.num_layers


@dataclass
class _Pass:
    """One forward (and maybe backward) of one network over a micro-batch."""

    name: str
    net: str
    batch_factor: int
    """Samples per micro-batch sample (3 for D on [real, perturbed, fake])."""
    layers: int
    graph: bool
    trains: bool
    """Its weights get gradients in this pass (a reduce-scatter under ZeRO-3)."""
    zero: bool = True
    """Its parameters are ZeRO-3 shards (gathered per use); the cd teacher is not."""
    extra: bool = False
    """A pass only the pipeline layout runs (APT's G forward for the generator step's fakes): hardware work,
    not model FLOPs (models.flops does not count it)."""


def stage_phases(req: PlanRequest, cfg: MMDiTConfig, deepest: int) -> list[tuple[str, list[_Pass]]]:
    """The passes of one update, grouped in the phases whose memory is planned separately."""
    L = cfg.num_layers
    if req.stage in ("apt_image", "apt_video"):
        n_d = 3 if req.use_r1 else 2
        return [
            ("D update", [_Pass("G forward (no grad)", "G", 1, L, False, False),
                          _Pass(f"D forward+backward on {n_d} x micro-batch", "D", n_d, deepest, True, True)]),
            ("G update", [_Pass("G forward+backward", "G", 1, L, True, True),
                          _Pass("D forward+backward to its input (frozen)", "D", 1, deepest, True, False)]),
        ]
    if req.stage == "cd":
        return [("update", [_Pass("teacher forward, cond + uncond (no grad)", "teacher", 2, L, False, False,
                                  zero=False),
                            _Pass("EMA target forward (no grad)", "model", 1, L, False, False),
                            _Pass("student forward+backward", "model", 1, L, True, True)])]
    return [("update", [_Pass("forward+backward", "model", 1, L, True, True)])]


@dataclass
class _PassGroup:
    """The passes that end in one optimizer step (pipeline layout): each pass is one 1F1B schedule call."""

    name: str
    trained: str
    """The network whose optimizer steps after the group."""
    passes: list[_Pass]
    moves: int
    """Model outputs moved between the last and the first stage, one latent per sample each (G's fakes,
    dL/dfake, cd's ODE step)."""


def pipeline_groups(req: PlanRequest, cfg: MMDiTConfig, deepest: int) -> list[_PassGroup]:
    """The schedule calls of one update under the pipeline engine (parallel.execution.PipelineExecutor)."""
    L = cfg.num_layers
    if req.stage in ("apt_image", "apt_video"):
        n_d = 3 if req.use_r1 else 2
        return [
            _PassGroup("D update", "D", [
                _Pass("G forward (no grad)", "G", 1, L, False, False),
                _Pass(f"D forward+backward on {n_d} x micro-batch", "D", n_d, deepest, True, True)], 1),
            _PassGroup("G update", "G", [
                _Pass("G forward (no grad), fakes for dL/dfake", "G", 1, L, False, False, extra=True),
                _Pass("D forward+backward to its input (frozen)", "D", 1, deepest, True, False),
                _Pass("G forward+backward", "G", 1, L, True, True)], 2),
        ]
    if req.stage == "cd":
        return [_PassGroup("update", "model", [
            _Pass("teacher forward, cond + uncond (no grad)", "teacher", 2, L, False, False, zero=False),
            _Pass("EMA target forward (no grad)", "model", 1, L, False, False),
            _Pass("student forward+backward", "model", 1, L, True, True)], 1)]
    return [_PassGroup("update", "model", [_Pass("forward+backward", "model", 1, L, True, True)], 0)]


def _pass_activations(req: PlanRequest, cfg: MMDiTConfig, sample: Sample, p: _Pass, micro: int):
    """(stored, outside, working) bytes of one pass on one rank."""
    ab = _act_bytes(req)
    sp, tp = req.sp, req.tp
    tokens = micro * p.batch_factor * (sample.n_visual // sp + -(-sample.n_text // sp))
    unit = tokens * cfg.hidden_size * ab  # one D-wide tensor over the pass's tokens
    full = ACT_REPLICATED + ACT_TP / tp
    if not p.graph:
        return 0.0, 0.0, unit * (NOGRAD_REPLICATED + NOGRAD_TP / tp)
    trans = TRANSIENT_REPLICATED + TRANSIENT_TP / tp
    scope = checkpointing(req.activation_checkpointing)
    if scope == "mlp":  # every block keeps all but its MLP hidden; one MLP at a time is recomputed
        return (p.layers * unit * (full - MLP_HIDDEN_TP / tp), OUTSIDE_BLOCKS * unit,
                unit * (MLP_HIDDEN_TP / tp + trans))
    if scope == "attention":  # every block keeps its input and its attention output (heads split over tp)
        return p.layers * unit * (1 + 1 / tp), OUTSIDE_BLOCKS * unit, unit * (full + trans)
    if scope:
        return p.layers * unit, OUTSIDE_BLOCKS * unit, unit * (full + trans)
    return p.layers * unit * full, OUTSIDE_BLOCKS * unit, unit * trans


def plan_memory(req: PlanRequest, cfg: MMDiTConfig, sample: Sample, nets: dict[str, NetCount], deepest: int,
                micro: int) -> Memory:
    pb = 2 if req.precision == "bf16" else 4
    trained = {k: n for k, n in nets.items() if n.trainable}
    n_states = OPTIMIZER_STATES[req.optimizer]
    state_desc = OPTIMIZER_STATE_NAMES[req.optimizer]
    ema_nets = ([k for k in trained if k in ("G", "model")]) if req.ema else []
    static: list[Item] = []

    def add(label, f, keys=None, prefix=""):
        keys = list(trained) if keys is None else keys
        per = {k: float(f(nets[k])) for k in keys}
        note = prefix + ", ".join(f"{k} {v / GIB:.2f}" for k, v in per.items())
        static.append(Item(label, sum(per.values()), note, per))

    if req.engine == "deepspeed":
        add("parameters: ZeRO-3 shards", lambda n: n.partition * pb, prefix=f"{'bf16' if pb == 2 else 'fp32'}; ")
        add("parameters kept whole (persistence threshold)", lambda n: n.persistent * pb,
            prefix=f"<= {req.persistence_threshold:,} elements each; ")
        add("gradients: ZeRO-3 shards", lambda n: n.partition * pb)
        add("gradients: ZeRO-3 reduce buckets", lambda n: DS_REDUCE_BUCKET_SIZE * pb,
            prefix=f"reduce_bucket_size {DS_REDUCE_BUCKET_SIZE:.0e} elements per engine; ")
        add("fp32 master weights (shards)", lambda n: n.partition * 4)
        add("optimizer state (shards)", lambda n: n.partition * 4 * n_states, prefix=f"{state_desc}; ")
        if ema_nets:
            add("EMA (fp32 shards)", lambda n: n.partition * 4, ema_nets)
    else:
        add("parameters (fp32, whole)", lambda n: n.local * 4)
        add("optimizer state (fp32, whole)", lambda n: (n.local - n.unused) * 4 * n_states,
            prefix=f"{state_desc}, none for parameters no forward reaches; ")
        if ema_nets:
            add("EMA (fp32, whole)", lambda n: n.local * 4, ema_nets)
    frozen = [k for k, n in nets.items() if not n.trainable]
    for k in frozen:
        tb = 2 if req.precision == "bf16" else 4
        static.append(Item(f"{k} (frozen, whole per tensor-parallel rank)", nets[k].local * tb,
                           "bf16" if tb == 2 else "fp32", {k: float(nets[k].local * tb)}))

    phases: list[Phase] = []
    for pname, passes in stage_phases(req, cfg, deepest):
        items: list[Item] = []
        stored = outside = 0.0
        work = []
        for p in passes:
            s, o, w = _pass_activations(req, cfg, sample, p, micro)
            stored += s
            outside += o
            work.append((w, p.name))
        ckpt_desc = _ckpt_desc(req)
        items.append(Item("activations: " + ckpt_desc, stored,
                          "; ".join(f"{p.name}: {p.layers} blocks x {micro * p.batch_factor} sample(s)"
                                    for p in passes if p.graph)))
        items.append(Item("activations: outside the blocks", outside))
        w, wname = max(work)
        items.append(Item("activations: one block running", w, wname))
        used = {p.net for p in passes if p.zero}
        if req.engine == "deepspeed":
            blk = max(nets[k].largest_block for k in used)
            ws = min(WORKING_SET_BLOCKS * blk, DS_MAX_LIVE_PARAMETERS) * pb
            items.append(Item("gathered parameters (working set)", ws,
                              f"{WORKING_SET_BLOCKS} blocks of {blk / 1e6:.0f} M elements"))
            if req.stage == "cd":
                items.append(Item("EMA swap: clone of the fp32 master shards", nets["model"].partition * 4,
                                  "engines.ema_weights() while the target runs"))
            phases.append(Phase(pname, items))
        else:
            # plain torch: whole fp32 gradients appear during the backward while the stored inputs are freed,
            # and autocast's bf16 weight copies live only until the forward's autocast region ends
            grads = [p.net for p in passes if p.trains]
            g = sum(nets[k].local * 4 for k in grads)
            items.append(Item("gradients (fp32, whole)", g, ", ".join(grads)))
            cast = 0.0
            if req.precision == "bf16":
                big = max((p.net for p in passes), key=lambda k: nets[k].local)
                cast = nets[big].local * 2
                items.append(Item("autocast bf16 weight copies (forward only)", cast, big))
            moments = {"end of the forward": stored + outside + cast,
                       "start of the backward": stored + outside + w,
                       "end of the backward": g + w}
            when = max(moments, key=moments.get)
            phases.append(Phase(pname, items, moments[when], f"peak at the {when}"))
    if req.engine == "deepspeed":
        biggest = max(n.partition for n in trained.values())
        phases.append(Phase("optimizer step",
                            [Item("fp32 gradient of one sub-group", min(biggest, DS_SUB_GROUP_SIZE) * 4)]))
    return Memory(static, phases, req.reserve_gib, req.fragmentation)


def _packed_tokens(cfg: MMDiTConfig, sample: Sample, net: str, n_heads: int) -> int:
    """Tokens of the tensor one pipeline stage sends the next per sample (parallel.pipeline.PipelineStage._pack):
    visual + text + the timestep embedding (+ 12 shared adaLN vectors) (+ one slot per discriminator head)."""
    return (sample.n_visual + sample.n_text + 1 + (12 if cfg.adaln == "shared" else 0)
            + (n_heads if net == "D" else 0))


def _outside_share(net: str, s: int, pp: int, blocks: list[dict[str, range]], head_layers: tuple) -> float:
    """The share of a pass's outside-the-blocks activations on pipeline stage s: they stay with the outputs
    (stage 0's embedding outputs are the first block's stored inputs), on the last stage for an MMDiT's
    output head, on the stage of each tapped layer for D's heads."""
    if net == "D" and head_layers:
        return sum(1 for layer in head_layers if (layer - 1) in blocks[s]["D"]) / len(head_layers)
    return 1.0 if s == pp - 1 else 0.0


def pipeline_memory(req: PlanRequest, cfg: MMDiTConfig, sample: Sample, stage_nets: list[dict[str, NetCount]],
                    blocks: list[dict[str, range]], deepest: int, micro: int, micro_steps: int,
                    head_layers: tuple = ()) -> list[Memory]:
    """Per-GPU memory of every pipeline stage (the pipeline engine; see the module docstring)."""
    pp, m = req.pp, micro_steps
    n_heads = len(head_layers)
    n_states = OPTIMIZER_STATES[req.optimizer]
    state_desc = OPTIMIZER_STATE_NAMES[req.optimizer]
    tb = 2 if req.precision == "bf16" else 4
    ckpt_desc = _ckpt_desc(req)
    out = []
    for s in range(pp):
        nets = stage_nets[s]
        trained = [k for k, n in nets.items() if n.trainable]
        ema_nets = [k for k in trained if k in ("G", "model")] if req.ema else []
        static: list[Item] = []

        def add(label, f, keys, prefix=""):
            per = {k: float(f(nets[k])) for k in keys}
            note = prefix + ", ".join(f"{k} {v / GIB:.2f}" for k, v in per.items())
            static.append(Item(label, sum(per.values()), note, per))

        add("parameters (fp32, whole per stage)", lambda n: n.local * 4, trained)
        add("optimizer state (ZeRO-1 shard over dp)" if req.zero1 else "optimizer state (fp32, whole per stage)",
            lambda n: n.zero1_shard * 4 * n_states, trained,
            prefix=f"{state_desc}; {'the rank holding the most, ' if req.zero1 else ''}"
                   "none for parameters no forward reaches; ")
        if ema_nets:
            add("EMA (fp32, whole per stage)", lambda n: n.local * 4, ema_nets)
        for k, n in nets.items():
            if not n.trainable:
                static.append(Item(f"{k} (frozen, whole per stage)", n.local * tb, "bf16" if tb == 2 else "fp32",
                                   {k: float(n.local * tb)}))
        phases: list[Phase] = []
        for g in pipeline_groups(req, cfg, deepest):
            for p in g.passes:
                net = nets[p.net]
                here = len(blocks[s][p.net])
                st, o, w = _pass_activations(req, cfg, sample, p, micro)
                flight = min(pp - s, m) if p.graph else 1
                ends = int(s > 0) + int(s < pp - 1)  # the tensor received from s - 1 and the one sent to s + 1
                packed = micro * p.batch_factor * _packed_tokens(cfg, sample, p.net, n_heads) * cfg.hidden_size * 4
                p2p = flight * ends * packed
                stored = st * here / p.layers * flight
                outside = o * flight * _outside_share(p.net, s, pp, blocks, head_layers)
                w = w if here else 0.0
                grads = (net.local - net.unused) * 4 if p.trains else 0.0
                # autocast caches bf16 copies of weights that require grad while the forward runs (not of a
                # network frozen for the pass, nor of the bf16 teacher)
                cached = req.precision == "bf16" and net.trainable and (p.trains or not p.graph)
                cast = net.local * 2 if cached else 0.0
                items = [
                    Item("activations: " + ckpt_desc, stored,
                         f"{here} of {p.layers} blocks x {micro * p.batch_factor} sample(s) x {flight} micro-batch(es) "
                         "in flight" if p.graph else ""),
                    Item("activations: outside the blocks", outside),
                    Item("activations: one block running", w),
                    Item("pipeline tensors received / sent (fp32)", p2p,
                         f"{ends} x {flight} micro-batch(es) x [{micro * p.batch_factor}, "
                         f"{_packed_tokens(cfg, sample, p.net, n_heads):,}, {cfg.hidden_size}]"),
                    Item("gradients (fp32, whole per stage)", grads, p.net if p.trains else ""),
                    Item("autocast bf16 weight copies (forward only)", cast, p.net if cast else ""),
                ]
                if p.graph:
                    moments = {"end of a forward": stored + outside + p2p + grads + cast,
                               "backward of a block": stored + outside + p2p + grads + w}
                    when = max(moments, key=moments.get)
                    phases.append(Phase(f"{g.name}: {p.name}", items, moments[when], f"peak at the {when}"))
                else:
                    phases.append(Phase(f"{g.name}: {p.name}", items))
        out.append(Memory(static, phases, req.reserve_gib, req.fragmentation))
    return out
