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

  Without activation checkpointing every block keeps its full activations. With selective checkpointing
  (`activation_checkpointing="mlp"`, the trainer's `parallel.checkpoint_scope=mlp`) every block keeps its full
  activations except the MLP's 4 D hidden before and after GELU (`MLP_HIDDEN_TP` = 8 D / tp of `ACT_TP`),
  which one MLP at a time recomputes; the recompute is the MLPs' forward FLOPs, and the tensor-parallel
  all-reduce of each MLP output (no attention, no Ulysses all-to-all) runs again. With
  `activation_checkpointing="attention"` every block keeps its input and its attention output (D / tp per
  token, its log-sum-exp aside) and recomputes everything else: the block's forward FLOPs but the attention
  core's, and all of a block's communication.
  Phases are planned separately (APT: the discriminator update, with D on the fused batch [real,
  perturbed real, fake] of 3 x micro-batch samples, and the generator update, with G and a frozen D both
  keeping graphs); the peak is the largest phase.
* **Runtime reserve**: `RESERVE_GIB` for the CUDA context, cuBLAS / cuDNN workspaces and NCCL buffers, plus
  `FRAGMENTATION` of the phase's dynamic memory for the caching allocator's fragmentation.

Parameters, gradient shards, master weights, optimizer state and EMA are counted exactly (checked against
DeepSpeed's own buffers in tests/unit/test_plan.py); the activation model is an estimate.

Step time: model FLOPs per sample of each pass come from `models.flops`; the planner runs them at the
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
`methods` under `parallel.execution.PipelineExecutor`, and `trainer.engines.PipelineEngine`). world = tp x dp x pp (no sequence
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


from megatron_apt.planning.inputs import (
    DS_REDUCE_BUCKET_SIZE,
    GIB,
    H100_80GB_GIB,
    INTER_NODE_GBPS,
    INTRA_NODE_GBPS,
    MEASURED_TRAIN_TFLOPS,
    OVERHEAD,
    STAGES,
    Item,
    LayoutError,
    Memory,
    Phase,
    Plan,
    PlanRequest,
    Sample,
    StagePlan,
    StepTime,
    image_sample,
    video_sample,
)
from megatron_apt.planning.networks import NetCount, build_networks, count_network, tp_local_numel, zero1_shard
from megatron_apt.planning.report import config_overrides, describe_layout, format_plan
from megatron_apt.planning.search import candidates, make_plan, request_from_config, search

__all__ = [
    "DS_REDUCE_BUCKET_SIZE", "GIB", "H100_80GB_GIB", "INTER_NODE_GBPS", "INTRA_NODE_GBPS", "Item", "LayoutError",
    "MEASURED_TRAIN_TFLOPS", "Memory", "NetCount", "OVERHEAD", "Phase", "Plan", "PlanRequest", "STAGES", "Sample",
    "StagePlan", "StepTime", "build_networks", "candidates", "config_overrides", "count_network", "describe_layout",
    "format_plan", "image_sample", "make_plan", "request_from_config", "search", "tp_local_numel", "video_sample",
    "zero1_shard",
]
