"""What a plan is asked and what it answers: the sample shapes, the request, the result records, the layout check, the hardware and activation constants (the package docstring explains the models)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from megatron_apt.config.model import DiscriminatorConfig, MMDiTConfig, get_model_config
from megatron_apt.config.train import STAGES
from megatron_apt.parallel.state import ParallelDims
from megatron_apt.trainer.batching import BatchPlan
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_apt.planning.networks import NetCount


GIB = float(2**30)

# ---- DeepSpeed ZeRO-3 defaults that trainer/engines.py leaves unchanged ---------------------------------
DS_REDUCE_BUCKET_SIZE = 500_000_000
"""zero_optimization.reduce_bucket_size: the contiguous gradient bucket, elements per engine."""
DS_SUB_GROUP_SIZE = 1_000_000_000
"""zero_optimization.sub_group_size: the optimizer step's fp32 gradient is built one sub-group at a time."""
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
"""zero_optimization.stage3_max_live_parameters: an upper bound on gathered parameter elements."""

# ---- hardware ------------------------------------------------------------------------------------------
H100_80GB_GIB = 81559 / 1024
"""An H100 80 GB as nvidia-smi reports it: 81,559 MiB = 79.6 GiB."""
MEASURED_TRAIN_TFLOPS = 364.0
"""Model TFLOP/s of the 2b APT training step measured on one H200 (bf16, micro-batch 1, 46,800 visual + 512
text tokens, activation checkpointing, compiled; 7319 model TFLOP in 20.1 s). The H100 SXM has the same
datasheet bf16 peak (989 TFLOP/s) and less memory bandwidth (3.35 vs 4.8 TB/s): this rate is assumed for
the H100, which makes the step times optimistic by the memory-bound share of the step."""
MEASURED_CONFIG = ("2b", 46_800, 512)
"""Preset, visual tokens and text tokens of that measurement (to convert it to a hardware FLOP rate)."""
INTER_NODE_GBPS = 40.0
"""Achieved all-gather / reduce-scatter bandwidth per GPU across nodes, GB/s (one 400 Gb/s NIC per GPU)."""
INTRA_NODE_GBPS = 300.0
"""Achieved all-reduce / all-to-all bandwidth per GPU inside an NVLink node, GB/s."""
OVERHEAD = 0.05
"""Allowance for the optimizer step, EMA update, data loading and logging, as a fraction of the update."""

# ---- activation model (elements of width D per token; see the module docstring) -------------------------
ACT_REPLICATED = 7
ACT_TP = 14
TRANSIENT_REPLICATED = 3
TRANSIENT_TP = 8
NOGRAD_REPLICATED = 3
NOGRAD_TP = 8
MLP_HIDDEN_TP = 8
"""Of ACT_TP: the MLP's 4 D hidden before and after GELU, which selective checkpointing ('mlp') recomputes."""
OUTSIDE_BLOCKS = 4
RESERVE_GIB = 2.0
FRAGMENTATION = 0.10
WORKING_SET_BLOCKS = 2



# ------------------------------------------------------------------------------------------------------
# samples
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One training sample as the model sees it."""

    kind: str
    """'image' or 'video'."""
    width: int
    height: int
    frames: int
    latent: tuple[int, int, int, int]
    """[C, T, H, W] of the VAE latent."""
    n_visual: int
    n_text: int

    def describe(self) -> str:
        C, T, H, W = self.latent
        what = (f"{self.width}x{self.height} image" if self.kind == "image"
                else f"{self.width}x{self.height} video, {self.frames} frames")
        return (f"{what} -> latent {C}x{T}x{H}x{W} -> {self.n_visual:,} visual + {self.n_text} text tokens "
                f"= {self.n_visual + self.n_text:,}")


def image_sample(cfg: MMDiTConfig, size: int = 1024, text_tokens: int = 512, vae_factor: int = 8,
                 height: int | None = None) -> Sample:
    """A size x size image (or size x height): latent H/8 x W/8, then the model's 2 x 2 patches
    (1024px -> 128x128 latent -> 64x64 = 4096 tokens)."""
    from megatron_apt.models.flops import visual_tokens

    w, h = size, height or size
    if w % vae_factor or h % vae_factor:
        raise ValueError(f"image {w}x{h} is not divisible by the VAE factor {vae_factor}")
    latent = (cfg.in_channels, 1, h // vae_factor, w // vae_factor)
    return Sample("image", w, h, 1, latent, visual_tokens(cfg, latent[1:]), text_tokens)


def video_sample(cfg: MMDiTConfig, width: int = 1280, height: int = 720, seconds: float = 2.0, fps: int = 24,
                 text_tokens: int = 512, vae_factor: int = 8, vae_temporal: int = 4) -> Sample:
    """A clip of seconds x fps + 1 frames (the causal video VAE's 1 + 4k frames: 2 s at 24 fps = 49 frames ->
    13 latent frames), latent H/8 x W/8: 1280x720 -> 16x13x90x160 -> 13x45x80 = 46,800 tokens."""
    from megatron_apt.models.flops import visual_tokens

    frames = int(round(seconds * fps)) + 1
    if width % vae_factor or height % vae_factor:
        raise ValueError(f"video {width}x{height} is not divisible by the VAE factor {vae_factor}")
    latent = (cfg.in_channels, 1 + (frames - 1) // vae_temporal, height // vae_factor, width // vae_factor)
    return Sample("video", width, height, frames, latent, visual_tokens(cfg, latent[1:]), text_tokens)


# ------------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------------
# the request and the plan
# ------------------------------------------------------------------------------------------------------
OPTIMIZER_STATES = {"rmsprop": 1, "adam": 2, "adamw": 2}
OPTIMIZER_STATE_NAMES = {"rmsprop": "RMSprop: square_avg", "adam": "Adam: exp_avg, exp_avg_sq",
                         "adamw": "AdamW: exp_avg, exp_avg_sq"}


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class PlanRequest:
    """A stage, a model and a layout to plan (request_from_config builds one from a training YAML)."""

    stage: str = "apt_image"
    """'flow', 'cd', 'apt_image' or 'apt_video'."""
    preset: str = "8b"
    """Model preset (config/model.py)."""
    model_overrides: dict = field(default_factory=dict)
    """MMDiTConfig fields changed on top of the preset."""
    head_layers: tuple | None = None
    """Discriminator head layers; None = the paper's 16/26/36-of-36 fractions."""
    world: int = 256
    """GPUs."""
    tp: int = 1
    """Tensor-parallel size."""
    sp: int = 1
    """Ulysses sequence-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (> 1 needs engine 'pipeline')."""
    micro_batch: int = 1
    """Samples per GPU group per forward."""
    global_batch: int = 9062
    """Samples per update, exactly (trainer.batching.plan_batch)."""
    steps: int | None = None
    """Updates, for the total time (None: no total)."""
    activation_checkpointing: bool | str = True
    """False, True (= 'block': every block recomputed), 'mlp' (only the blocks' MLPs recomputed) or 'attention'
    (the blocks but their attention kernels recomputed)."""
    precision: str = "bf16"
    """'bf16' (DeepSpeed bf16 or torch autocast) or 'fp32'."""
    engine: str = "deepspeed"
    """'deepspeed' (ZeRO-3), 'torch' (whole fp32 parameters on every rank) or 'pipeline' (pp stages under
    megatron's 1F1B schedule, whole fp32 parameters per stage, optimizer state sharded over dp)."""
    pipeline_layers: tuple | None = None
    """Engine 'pipeline': blocks per stage of G / flow / cd models (parallel.pipeline_layers); None = even.
    The discriminator always splits evenly."""
    zero1: bool = True
    """Engine 'pipeline': optimizer state sharded over data parallel (parallel.zero1)."""
    zero_stage: int = 3
    persistence_threshold: int = 100_000
    """ZeRO-3 stage3_param_persistence_threshold (parallel.zero_persistence_threshold)."""
    optimizer: str = "rmsprop"
    """'rmsprop' (one state tensor), 'adam' or 'adamw' (two: torch's Adam keeps exp_avg even with beta1 = 0)."""
    ema: bool = True
    """An fp32 EMA of G (APT), of the target network (cd) or of the model (flow with apt.ema_decay > 0)."""
    use_r1: bool = True
    """aR1 adds the perturbed real samples to the discriminator's fused batch (3 x micro-batch, else 2 x)."""
    sample: Sample | None = None
    """None: a 1024px image for apt_image, a 1280x720 2 s video otherwise."""
    gpu_mem_gib: float = H100_80GB_GIB
    """Memory a layout must fit in."""
    gpus_per_node: int = 8
    """tp x sp must stay inside a node."""
    tflops: float = MEASURED_TRAIN_TFLOPS
    """Model TFLOP/s per GPU of a training step (measured)."""
    inter_node_gbps: float = INTER_NODE_GBPS
    intra_node_gbps: float = INTRA_NODE_GBPS
    reserve_gib: float = RESERVE_GIB
    fragmentation: float = FRAGMENTATION

    def model_config(self) -> MMDiTConfig:
        return get_model_config(self.preset, **self.model_overrides)

    def resolved_sample(self) -> Sample:
        if self.sample is not None:
            return self.sample
        cfg = self.model_config()
        return image_sample(cfg) if self.stage == "apt_image" else video_sample(cfg)


@dataclass
class Item:
    label: str
    bytes: float
    note: str = ""
    per: dict = field(default_factory=dict)
    """Bytes of each network, where the item is a sum over networks."""


@dataclass
class Phase:
    name: str
    items: list[Item]
    peak: float | None = None
    """Set when the items do not all coexist (the torch engine: gradients grow as stored inputs are freed)."""
    peak_note: str = ""

    @property
    def bytes(self) -> float:
        return sum(i.bytes for i in self.items) if self.peak is None else self.peak


@dataclass
class Memory:
    static: list[Item]
    phases: list[Phase]
    reserve_gib: float
    fragmentation: float

    @property
    def static_bytes(self) -> float:
        return sum(i.bytes for i in self.static)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def fragmentation_bytes(self) -> float:
        return self.fragmentation * self.peak_phase.bytes

    @property
    def total_bytes(self) -> float:
        return self.static_bytes + self.peak_phase.bytes + self.fragmentation_bytes + self.reserve_gib * GIB

    def item(self, label: str) -> float:
        """Bytes of a static item by its label (0 if absent)."""
        return sum(i.bytes for i in self.static if i.label == label)


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class StepTime:
    per_update_s: float
    compute_s: float
    exposed_zero_s: float
    tpsp_s: float
    overhead_s: float
    micro_steps: int
    samples_slowest_rank: int
    flops_model_per_sample: float
    flops_hardware_per_sample: float
    hw_rate_tflops: float
    passes: list[dict[str, Any]]
    updates: int | None = None
    pp: int = 1
    """Pipeline stages (the fields below stay 0 outside the pipeline engine)."""
    bubble_fraction: float = 0.0
    """(pp - 1) / (m + pp - 1): the share of each 1F1B call the slowest stage is not busy."""
    bubble_s: float = 0.0
    """Seconds of the update spent in pipeline bubbles (part of compute_s, tpsp_s and p2p_s)."""
    p2p_s: float = 0.0
    """Point-to-point traffic between stages, in every schedule slot, plus first <-> last stage moves."""
    dp_allreduce_s: float = 0.0
    """Data-parallel gradient all-reduces, one per trained pass group."""
    zero1_broadcast_s: float = 0.0
    """ZeRO-1 parameter broadcasts, one per optimizer step."""

    @property
    def total_hours(self) -> float | None:
        return None if self.updates is None else self.updates * self.per_update_s / 3600


@dataclass
class StagePlan:
    """One pipeline stage as each of its ranks holds it."""

    index: int
    blocks: dict[str, range]
    """Blocks each network runs on this stage (D's carried, never-run blocks not included)."""
    nets: dict[str, NetCount]
    """The stage's parameters per network (tensor-parallel local)."""
    memory: Memory


@dataclass
class Plan:
    request: PlanRequest
    dims: ParallelDims
    batch: BatchPlan
    sample: Sample
    nets: dict[str, NetCount]
    """Whole networks (under the pipeline engine these equal the sums over the stages)."""
    memory: Memory
    """Per GPU; under the pipeline engine, the heaviest stage's."""
    time: StepTime
    stages: list[StagePlan] = field(default_factory=list)
    """Pipeline engine: every stage (empty otherwise)."""

    @property
    def heaviest_stage(self) -> StagePlan | None:
        return max(self.stages, key=lambda s: s.memory.total_bytes) if self.stages else None

    @property
    def total_gib(self) -> float:
        return self.memory.total_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.request.gpu_mem_gib


class LayoutError(ValueError):
    """A layout that cannot run at all (divisibility), as opposed to one that does not fit in memory."""


def check_layout(req: PlanRequest, cfg: MMDiTConfig, sample: Sample) -> ParallelDims:
    if req.stage not in STAGES:
        raise LayoutError(f"unknown stage {req.stage!r}; known: {', '.join(STAGES)}")
    if req.engine == "deepspeed" and req.zero_stage != 3:
        raise LayoutError("the planner models DeepSpeed ZeRO-3 (parallel.zero_stage=3) or the torch engine")
    if req.engine not in ("deepspeed", "torch", "pipeline"):
        raise LayoutError(f"engine must be deepspeed, torch or pipeline, got {req.engine!r}")
    if req.pp < 1:
        raise LayoutError(f"pipeline size must be >= 1, got pp={req.pp}")
    if req.pp > 1 and req.engine != "pipeline":
        raise LayoutError(f"pp={req.pp} needs engine pipeline (parallel.engine=pipeline): DeepSpeed's ZeRO-3 and the "
                          "torch engine do not combine with pipeline stages")
    if req.engine == "pipeline":
        if req.sp > 1:
            raise LayoutError(f"engine pipeline does not combine with Ulysses sequence parallel (sp={req.sp})")
        if req.pp > cfg.num_layers:
            raise LayoutError(f"{cfg.num_layers} blocks cannot be split over {req.pp} pipeline stages")
        if req.stage in ("apt_image", "apt_video"):
            deepest = max(DiscriminatorConfig(head_layers=tuple(req.head_layers) if req.head_layers else None)
                          .resolve_layers(cfg.num_layers))
            if req.pp > deepest:
                raise LayoutError(f"the discriminator's {deepest} blocks (up to its deepest head) cannot be split "
                                  f"over {req.pp} pipeline stages")
        if req.pipeline_layers is not None:
            counts = [int(n) for n in req.pipeline_layers]
            if len(counts) != req.pp or sum(counts) != cfg.num_layers or min(counts) < 1:
                raise LayoutError(f"pipeline_layers {counts} must list {req.pp} positive block counts summing to "
                                  f"{cfg.num_layers}")
    try:
        dims = ParallelDims.from_world(req.world, tp=req.tp, sp=req.sp, pp=req.pp)
    except ValueError as e:
        raise LayoutError(str(e)) from None
    if cfg.num_heads % (req.tp * req.sp):
        raise LayoutError(f"{cfg.num_heads} attention heads are not divisible by tp x sp = {req.tp} x {req.sp}")
    if req.tp * req.sp > req.gpus_per_node:
        raise LayoutError(f"tp x sp = {req.tp * req.sp} spans more than one node of {req.gpus_per_node} GPUs "
                          "(their collectives need NVLink)")
    if sample.n_visual % req.sp:
        raise LayoutError(f"{sample.n_visual} visual tokens do not split over sequence parallel {req.sp}")
    if req.micro_batch < 1:
        raise LayoutError("micro-batch must be >= 1")
    if req.global_batch < dims.dp:
        raise LayoutError(f"global batch {req.global_batch} cannot be formed over {dims.dp} data-parallel ranks")
    return dims
