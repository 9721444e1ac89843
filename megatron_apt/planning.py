"""Memory and step-time planner: will a stage fit on a GPU with a given layout, and how long is an update?

    from megatron_apt.planning import PlanRequest, make_plan, format_plan, search
    plan = make_plan(PlanRequest(stage="apt_video", world=1024, tp=1, sp=1, micro_batch=1, global_batch=2048))
    print(format_plan(plan))                       # or: python tools/plan.py --stage apt_video --gpus 1024

The networks are built on the meta device (no memory), so parameter counts are exact for any preset. Per GPU
the planner counts, for every engine the trainer builds (APT: G and D; cd: the student plus a frozen
teacher; flow: one model):

* **Parameters** under DeepSpeed ZeRO-3: each tensor-parallel-local parameter padded to a multiple of the
  ZeRO group (data parallel x sequence parallel, see `trainer.engines.MegatronMPU`) and cut into equal
  shards, ceil(n / zero_world) elements per rank, in bf16. Parameters with at most
  `stage3_param_persistence_threshold` elements also stay whole on every rank. While a block runs its
  parameters are gathered: the working set is taken as two of the largest blocks (the one running and the
  one prefetched; recompute and backward of a block reuse one gather).
* **Gradients**: ZeRO-3 keeps a bf16 gradient shard per parameter shard (DeepSpeed's gradient
  accumulation dtype is the model dtype unless configured) and a contiguous reduce bucket of
  `reduce_bucket_size` (5e8, DeepSpeed's default; the trainer does not change it) elements per engine;
  the optimizer step builds an fp32 copy of one sub-group's gradient shard for the update.
* **fp32 master weights and optimizer state**: 4 bytes per shard element each; RMSprop keeps one state
  tensor (square_avg), AdamW two.
* **EMA** (G for APT, the target network for cd, the model for flow when apt.ema_decay > 0): one fp32
  tensor per fp32 master shard. cd's `ema_weights()` also holds a clone of the master shards while the
  target runs.
* **The cd teacher**: a plain module, whole on every rank of a tensor-parallel group (bf16).
* **Activations**, at the real sequence lengths (visual tokens / sp and text tokens padded to a multiple of
  sp per rank; bf16). The model per transformer block, in elements of width D per token (D = hidden size):

  - with activation checkpointing every block of every pass that keeps a graph stores its inputs: the
    visual and text streams, 1 x D per token (timestep, modulation and rotary tables are shared by all
    blocks and negligible);
  - one block at a time is recomputed in the backward pass and holds its full activations:
    `ACT_REPLICATED` = 7 D per token outside the tensor-parallel region (two LayerNorm outputs, two
    modulated inputs, the attention-output and MLP-output tensors the gates multiply, the mid-block
    residual) and `ACT_TP` = 14 D / tp inside it (q and k before their RMSNorm, the concatenated joint
    q, k, v the attention kernel keeps, its output, the MLP's 4 D hidden before and after GELU);
  - its backward adds gradient buffers of about `TRANSIENT_REPLICATED` + `TRANSIENT_TP` / tp = 3 + 8 / tp
    D per token;
  - attention runs in flash / cuDNN kernels, which keep O(L) (the output and a log-sum-exp per query),
    never the L x L score matrix;
  - outside the blocks (embeddings, the output head, the discriminator heads, latents and noise)
    `OUTSIDE_BLOCKS` = 4 D per token per pass;
  - a forward without a graph (G in the discriminator update, the cd teacher and target) peaks at about
    `NOGRAD_REPLICATED` + `NOGRAD_TP` / tp = 3 + 8 / tp D per token for one block.

  Without activation checkpointing every block keeps its full activations.
  Phases are planned separately (APT: the discriminator update, with D on the fused batch [real,
  perturbed real, fake] of 3 x micro-batch samples, and the generator update, with G and a frozen D both
  keeping graphs); the peak is the largest phase.
* **Runtime reserve**: `RESERVE_GIB` for the CUDA context, cuBLAS / cuDNN workspaces and NCCL buffers, plus
  `FRAGMENTATION` of the phase's dynamic memory for the caching allocator's fragmentation.

Parameters, gradient shards, master weights, optimizer state and EMA are counted exactly (checked against
DeepSpeed's own buffers in tests/unit/test_plan.py); the activation model is an estimate.

Step time: model FLOPs per sample of each pass come from `metrics.flops`; the planner runs them at the
measured single-GPU training rate (`MEASURED_TRAIN_TFLOPS`, the 2b APT step on one H200 in model FLOP/s,
converted to a hardware rate that includes activation-checkpointing recompute) split over the tp x sp
GPUs that share a sample. Communication: ZeRO-3 all-gathers each engine's parameters once per forward
and once for recompute + backward, and reduce-scatters its gradients, in every micro-step, over the
inter-node network (`INTER_NODE_GBPS` per GPU), overlapped with that pass's compute (a pass costs
max(compute, traffic)); tensor-parallel all-reduces and Ulysses all-to-alls run inside a node
(`INTRA_NODE_GBPS`) and are not overlapped; `OVERHEAD` is added for the optimizer step, EMA, data loading
and logging. The slowest data-parallel rank (the one with the most samples of the exact global batch)
sets the update time.

Pipeline layout (`parallel.engine=pipeline`, `parallel.pp` stages; see `parallel.pipeline`,
`methods.pipeline_stages` and `trainer.engines.PipelineEngine`). world = tp x dp x pp (no sequence
parallel). Every network is cut into pp stages exactly as the trainer cuts it (`make_pipeline_stage` on a
meta-device network, one fresh network per stage): stage 0 holds the embeddings, the last stage the output
head; G, flow and cd models split their blocks evenly or as `pipeline_layers` says, D splits the blocks up
to its deepest head layer evenly and its last stage also carries the blocks past it and the output head,
which never run. The planner counts every stage and reports the heaviest:

* **Parameters** fp32, whole on every rank of a stage (bf16 autocast keeps bf16 copies of the weights of
  a network whose parameters require grad while a forward runs); **gradients** fp32, whole, for the
  stage's parameters that get one, alive from the first backward of a 1F1B call to the optimizer step;
  **optimizer state** sharded over data parallel (ZeRO-1, torch's `ZeroRedundancyOptimizer`, which gives
  whole parameters, largest first, to the least-loaded rank: the planner replays that assignment and
  counts the rank holding the most state); **EMA** fp32 whole per stage; the cd **teacher** bf16 whole
  per stage.
* **Passes**: every pass is one megatron 1F1B schedule call over the rank's m micro-batches. APT's
  discriminator update runs G forward-only and D forward+backward on the fused 3 (2 without aR1) x
  micro-batch; its generator update runs G forward-only (an extra pass only this layout has: the fakes
  are needed before D can give dL/dfake), D forward+backward to its input (frozen), then G forward+backward.
  cd: teacher forward-only on 2 x micro-batch, EMA target forward-only, student forward+backward; flow:
  one forward+backward. Each call is planned as its own memory phase.
* **Activations** under 1F1B: stage s keeps the stored activations of up to min(pp - s, m) micro-batches
  in flight (stage 0 the most), each with the stage's share of the pass's blocks (the per-block model
  above) and the fp32 tensors the stage received and sent ([batch, visual + text + 1 (+ 12 shared adaLN
  vectors) (+ one slot per D head), hidden]; megatron keeps a stage's output until its backward). The
  outside-the-blocks allowance stays with the outputs: on the last stage (an MMDiT's output head) or,
  for D, split over the stages of its heads (stage 0's embedding outputs are the first block's stored
  inputs). Gradients are counted alongside the in-flight activations (from the first backward on, 1F1B
  keeps starting forwards), the autocast weight copies at the end of a forward, one block's working
  set in a backward.
* **Step time**: a call over m micro-batches takes (m + pp - 1) slots of the slowest stage's micro-batch
  time (its FLOPs: the ops of its blocks, plus the embeddings on stage 0, the output head on the last and
  each D head where its layer is, over tp GPUs, at the hardware rate); (pp - 1) / (m + pp - 1) of it is
  the bubble. Each slot also carries the stage's point-to-point tensor, one way for forward-only passes
  and both ways otherwise, over the inter-node network, not overlapped (conservative); the model outputs
  moved between the last and the first stage (G's fakes, dL/dfake, cd's ODE step) are added. After each
  trained pass group the data-parallel gradient all-reduce (2 x stage parameters with gradients x 4 bytes
  x (dp - 1) / dp) and after each optimizer step the ZeRO-1 parameter broadcast (stage parameters x 4 x
  (dp - 1) / dp) run over the inter-node network, not overlapped; tensor-parallel all-reduces as above
  with the stage's blocks.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_apt.config.model import DiscriminatorConfig, MMDiTConfig, get_model_config
from megatron_apt.parallel.state import ParallelDims
from megatron_apt.trainer.batching import BatchPlan, plan_batch

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
OUTSIDE_BLOCKS = 4
RESERVE_GIB = 2.0
FRAGMENTATION = 0.10
WORKING_SET_BLOCKS = 2

STAGES = ("flow", "cd", "apt_image", "apt_video")


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
    from megatron_apt.metrics.flops import visual_tokens

    w, h = size, height or size
    if w % vae_factor or h % vae_factor:
        raise ValueError(f"image {w}x{h} is not divisible by the VAE factor {vae_factor}")
    latent = (cfg.in_channels, 1, h // vae_factor, w // vae_factor)
    return Sample("image", w, h, 1, latent, visual_tokens(cfg, latent[1:]), text_tokens)


def video_sample(cfg: MMDiTConfig, width: int = 1280, height: int = 720, seconds: float = 2.0, fps: int = 24,
                 text_tokens: int = 512, vae_factor: int = 8, vae_temporal: int = 4) -> Sample:
    """A clip of seconds x fps + 1 frames (the causal video VAE's 1 + 4k frames: 2 s at 24 fps = 49 frames ->
    13 latent frames), latent H/8 x W/8: 1280x720 -> 16x13x90x160 -> 13x45x80 = 46,800 tokens."""
    from megatron_apt.metrics.flops import visual_tokens

    frames = int(round(seconds * fps)) + 1
    if width % vae_factor or height % vae_factor:
        raise ValueError(f"video {width}x{height} is not divisible by the VAE factor {vae_factor}")
    latent = (cfg.in_channels, 1 + (frames - 1) // vae_temporal, height // vae_factor, width // vae_factor)
    return Sample("video", width, height, frames, latent, visual_tokens(cfg, latent[1:]), text_tokens)


# ------------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------------
# parameters of the backbone's blocks, the only ones tensor parallel splits (G and D hold it as .backbone)
_BLOCK_PARAM = re.compile(r"^(?:backbone\.)?blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _tp_kinds() -> dict[str, str]:
    from megatron_apt.parallel.tensor_parallel import BLOCK_PLAN

    return dict(BLOCK_PLAN)


def tp_local_numel(name: str, numel: int, tp: int, kinds: dict[str, str] | None = None) -> int:
    """Elements of parameter `name` on one tensor-parallel rank (the plan of parallel.tensor_parallel:
    column-parallel weights and biases and row-parallel weights are split, everything else is whole)."""
    if tp == 1:
        return numel
    kinds = kinds if kinds is not None else _tp_kinds()
    m = _BLOCK_PARAM.search(name)
    if not m:
        return numel
    kind = kinds.get(m.group(2))
    if kind == "column" or (kind == "row" and m.group(3) == "weight"):
        if numel % tp:
            raise ValueError(f"{name} ({numel} elements) does not split over tensor parallel {tp}")
        return numel // tp
    return numel


@dataclass
class NetCount:
    """One network as one rank holds it."""

    name: str
    total: int
    """Parameters of the whole network."""
    local: int
    """Parameters on one tensor-parallel rank."""
    partition: int
    """ZeRO-3 shard elements on one rank: sum over parameters of ceil(local / zero_world)."""
    persistent: int
    """Elements of parameters small enough to stay whole on every rank (ZeRO-3 persistence threshold)."""
    largest_block: int
    """Tensor-parallel-local elements of the largest transformer block (the gathered working set)."""
    unused: int = 0
    """Tensor-parallel-local elements that no forward reaches (D's output head and any block past its deepest
    head layer): they never get a gradient, so torch optimizers keep no state for them (ZeRO-3's flat
    shards do)."""
    trainable: bool = True
    zero1_shard: int = 0
    """Pipeline engine: elements with optimizer state on the data-parallel rank that holds the most under
    ZeRO-1 (see the function `zero1_shard`); without ZeRO-1, every element that gets a gradient."""


def _unused(module: torch.nn.Module, pname: str) -> bool:
    """Parameters no forward of this network reaches."""
    layers = getattr(module, "head_layers", None)
    if layers:  # the discriminator stops after its deepest head layer (features_at); [] on other pipeline stages
        if pname.startswith(("backbone.norm_out.", "backbone.proj_out.")):
            return True
        m = _BLOCK_PARAM.search(pname)
        if m and int(m.group(1)) >= max(layers):
            return True
    # SD3 checkpoints keep a text query in the last (context-pre-only) block that is never used
    m = _BLOCK_PARAM.search(pname)
    backbone = getattr(module, "backbone", module)
    if m and (".c_q." in "." + m.group(2) + "." or ".c_norm_q." in "." + m.group(2) + "."):
        blocks = backbone.blocks  # a pipeline stage keeps its blocks in a ModuleDict keyed by block index
        block = blocks[m.group(1)] if isinstance(blocks, torch.nn.ModuleDict) else blocks[int(m.group(1))]
        return bool(block.context_pre_only)
    return False


def count_network(module: torch.nn.Module, name: str, tp: int, zero_world: int, persistence_threshold: int,
                  trainable: bool = True) -> NetCount:
    kinds = _tp_kinds()
    total = local = partition = persistent = unused = 0
    blocks: dict[int, int] = {}
    for pname, p in module.named_parameters():
        n = p.numel()
        nl = tp_local_numel(pname, n, tp, kinds)
        total += n
        local += nl
        partition += -(-nl // zero_world)
        if nl <= persistence_threshold:
            persistent += nl
        if _unused(module, pname):
            unused += nl
        m = _BLOCK_PARAM.search(pname)
        if m:
            blocks[int(m.group(1))] = blocks.get(int(m.group(1)), 0) + nl
    return NetCount(name, total, local, partition, persistent, max(blocks.values(), default=0), unused, trainable)


def zero1_shard(module: torch.nn.Module, tp: int, dp: int) -> int:
    """Elements with optimizer state on the most loaded of `dp` ranks under torch's ZeroRedundancyOptimizer:
    it gives whole parameters, largest first (a stable sort), each to the rank with the fewest elements so
    far (the lowest rank on a tie); state exists only for parameters that get a gradient."""
    kinds = _tp_kinds()
    params = [(tp_local_numel(n, p.numel(), tp, kinds), not _unused(module, n)) for n, p in module.named_parameters()
              if p.requires_grad]
    heap = [(0, r) for r in range(max(dp, 1))]
    state = [0] * max(dp, 1)
    for n, used in sorted(params, key=lambda x: x[0], reverse=True):
        size, r = heapq.heappop(heap)
        heapq.heappush(heap, (size + n, r))
        if used:
            state[r] += n
    return max(state)


def build_networks(stage: str, model_cfg: MMDiTConfig, dcfg: DiscriminatorConfig | None = None
                   ) -> dict[str, torch.nn.Module]:
    """The stage's networks on the meta device, as the trainer builds them (methods/stages.py)."""
    from megatron_apt.models import Discriminator, MMDiT, OneStepGenerator

    with torch.device("meta"):
        if stage in ("apt_image", "apt_video"):
            return {"G": OneStepGenerator(MMDiT(model_cfg)), "D": Discriminator(MMDiT(model_cfg), dcfg)}
        if stage == "cd":
            return {"model": MMDiT(model_cfg), "teacher": MMDiT(model_cfg)}
        if stage == "flow":
            return {"model": MMDiT(model_cfg)}
    raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")


# ------------------------------------------------------------------------------------------------------
# the request and the plan
# ------------------------------------------------------------------------------------------------------
OPTIMIZER_STATES = {"rmsprop": 1, "adam": 2, "adamw": 2}
OPTIMIZER_STATE_NAMES = {"rmsprop": "RMSprop: square_avg", "adam": "Adam: exp_avg, exp_avg_sq",
                         "adamw": "AdamW: exp_avg, exp_avg_sq"}


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
    activation_checkpointing: bool = True
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


def _act_bytes(req: PlanRequest) -> int:
    return 2 if req.precision == "bf16" else 4


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
    not model FLOPs (metrics.flops does not count it)."""


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
    """The schedule calls of one update under the pipeline engine (methods.pipeline_stages)."""
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
    if req.activation_checkpointing:
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
        ckpt_desc = "inputs of every block" if req.activation_checkpointing else "every block's activations"
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
    ckpt_desc = "inputs of every block" if req.activation_checkpointing else "every block's activations"
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


# ------------------------------------------------------------------------------------------------------
# step time
# ------------------------------------------------------------------------------------------------------
def _sum(ops, attr, blocks_only=False):
    return sum(getattr(o, attr) for o in ops if (o.in_blocks or not blocks_only))


def _pass_ops(cfg: MMDiTConfig, sample: Sample, p: _Pass, dcfg):
    from megatron_apt.metrics.flops import discriminator_ops, mmdit_ops

    n = p.batch_factor
    if p.net == "D":
        return discriminator_ops(cfg, n, sample.n_visual, sample.n_text, dcfg, weights_grad=p.trains,
                                 input_grad=p.graph and not p.trains)
    return mmdit_ops(cfg, n, sample.n_visual, sample.n_text, weights_grad=p.trains)


def _ops_flops(req: PlanRequest, ops, p: _Pass) -> tuple[float, float]:
    model = _sum(ops, "forward") + (_sum(ops, "backward") if p.graph else 0)
    recompute = _sum(ops, "forward", True) if (p.graph and req.activation_checkpointing) else 0
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
    from megatron_apt.metrics.flops import apt_step_flops

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
            n_fwd = 1 + (1 if p.graph and req.activation_checkpointing else 0)
            t = 0.0
            if tp > 1:
                n_ar = 2 * n_fwd + (4 if p.graph else 0)
                t += p.layers * n_ar * unit * 2 * (tp - 1) / tp / (req.intra_node_gbps * 1e9)
            if sp > 1:
                n_a2a = 4 * (n_fwd + (1 if p.graph else 0))
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
            n_fwd = 1 + (1 if p.graph and req.activation_checkpointing else 0)
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
            # the discriminator is always split evenly (methods.pipeline_stages: stage_of(D, layers=False))
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


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


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
             f"activation checkpointing {'on' if r.activation_checkpointing else 'off'}; {r.precision}")
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


def request_from_config(cfg, world: int, **kw) -> PlanRequest:
    """A PlanRequest for a TrainConfig (megatron_apt.config.train) on `world` GPUs."""
    c = cfg
    ema = c.stage in ("apt_image", "apt_video", "cd") or c.apt.ema_decay > 0
    return PlanRequest(stage=c.stage, preset=c.model.preset, model_overrides=dict(c.model.overrides),
                       head_layers=tuple(c.model.head_layers) if c.model.head_layers else None, world=world,
                       tp=c.parallel.tp, sp=c.parallel.sp, pp=c.parallel.pp,
                       pipeline_layers=tuple(c.parallel.pipeline_layers) if c.parallel.pipeline_layers else None,
                       zero1=c.parallel.zero1, micro_batch=c.micro_batch, global_batch=c.global_batch,
                       steps=c.steps, activation_checkpointing=c.parallel.activation_checkpointing,
                       precision=c.precision, engine=c.parallel.engine, zero_stage=c.parallel.zero_stage,
                       persistence_threshold=c.parallel.zero_persistence_threshold, optimizer=c.optim.optimizer,
                       ema=ema, use_r1=c.apt.use_r1, **kw)


__all__ = [
    "DS_REDUCE_BUCKET_SIZE", "H100_80GB_GIB", "INTER_NODE_GBPS", "INTRA_NODE_GBPS", "Item", "LayoutError",
    "MEASURED_TRAIN_TFLOPS", "Memory", "NetCount", "Phase", "Plan", "PlanRequest", "Sample", "StagePlan", "StepTime",
    "build_networks", "candidates", "config_overrides", "count_network", "format_plan", "image_sample", "make_plan",
    "request_from_config", "search", "tp_local_numel", "video_sample", "zero1_shard",
]
