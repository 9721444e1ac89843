"""Training configuration: dataclasses with a docstring under each field, YAML files, dotted overrides.

    cfg = load_config("examples/configs/apt_video_8b.yaml", ["optim.lr=3e-6", "parallel.tp=2"])

Unknown keys (in YAML or overrides) are errors that name the key and the known ones. The paper's numbers
are the defaults here and in the YAML files, not in code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_apt.config.model import MMDiTConfig, get_model_config

STAGES = ("flow", "cd", "apt_image", "apt_video")
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "flash_attn", "efficient", "math")


# What activation checkpointing recomputes (parallel.checkpoint_scope): whole blocks, only their MLPs, or
# everything but the attention kernel.
CHECKPOINT_SCOPES = ("block", "mlp", "attention")


def checkpointing(enabled, scope: str = "block"):
    """The one value the parallel layer, the FLOP counts and the planner take: False (off), 'block', 'mlp' or
    'attention'.
    `enabled` is parallel.activation_checkpointing (a bool, or already a scope), `scope` parallel.checkpoint_scope."""
    if not enabled:
        return False
    scope = enabled if isinstance(enabled, str) else scope
    if scope not in CHECKPOINT_SCOPES:
        raise ValueError(f"activation checkpointing scope must be one of {', '.join(CHECKPOINT_SCOPES)}, "
                         f"got {scope!r}")
    return scope


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class ModelSection:
    preset: str = "debug"
    """Size preset from the registry (debug, toy, 2b, 8b, sd3.5-large)."""
    overrides: dict = field(default_factory=dict, metadata={"schema": MMDiTConfig})
    """MMDiTConfig fields to change on top of the preset (on the command line also one at a time:
    model.overrides.num_layers=6)."""
    init: str | None = None
    """Model directory to start the generator / student from (flow: optional; cd: the diffusion model;
    apt: the consistency-distilled G-hat, or the image stage's exported EMA generator)."""
    teacher: str | None = None
    """cd: the frozen diffusion teacher; apt: the diffusion weights the discriminator backbone starts from."""
    head_layers: list[int] | None = None
    """APT discriminator head layers (1-based); None = the paper's 16/26/36-of-36 fractions."""
    attention_backend: str = field(default_factory=lambda: os.environ.get("MEGATRON_APT_ATTN", "auto"))
    """Attention kernel: auto (CUDA: cuDNN SDPA first, then flash, memory-efficient, math), cudnn, flash,
    efficient, math (PyTorch SDPA backends) or flash_attn (the flash-attn package). One that this machine cannot
    run is an error; auto's choice is logged. Default: $MEGATRON_APT_ATTN, else auto."""


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class DataSection:
    path: str | None = None
    """Prefix of an indexed dataset written by tools/preprocess_video.py; None with synthetic=true."""
    synthetic: bool = False
    """Random latents and text of `synthetic_shape` (tests and throughput runs)."""
    synthetic_shape: list[int] = field(default_factory=lambda: [4, 1, 8, 8])
    """[C, T, H, W] of synthetic latents."""
    synthetic_text_len: int = 8
    """Text tokens per synthetic sample: the longest caption (lengths are drawn from 1..synthetic_text_len), or
    every caption's length with synthetic_fixed_text_len."""
    synthetic_fixed_text_len: bool = False
    """Every synthetic caption is exactly synthetic_text_len tokens: no padding mask and one text length, as the
    profiler's step (throughput runs that compare with it; a compiled step then compiles one text size)."""
    synthetic_size: int = 64
    """Samples in the synthetic set."""
    latent_scale: float = 1.0
    """Multiplies stored latents/pixels on load (pixels in [-1, 1] usually need none)."""
    max_text_len: int = 64
    """Text tokens kept per sample."""
    preload: bool = False
    """Hold the whole data set in device memory and gather micro-batches there (small data sets such as
    the toy task: large batches of a small model are then limited by the GPU, not by per-sample reads)."""


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
DEEPSPEED_BF16 = ("params", "autocast")  # parallel.deepspeed_bf16


@dataclass
class ParallelSection:
    tp: int = 1
    """Tensor-parallel size."""
    sp: int = 1
    """Ulysses sequence-parallel size."""
    pp: int = 1
    """Pipeline-parallel size; > 1 needs engine 'pipeline'."""
    engine: str = "deepspeed"
    """'deepspeed' (ZeRO-3 engines), 'torch' (plain optimizer, gradients averaged over DP x SP) or
    'pipeline' (megatron-core pipeline schedules over pp stages, optimizer state sharded over DP)."""
    pipeline_layers: list[int] | None = None
    """Blocks per pipeline stage for G / flow / CD models (e.g. [17, 19]); None = even split. The
    discriminator, cut after its deepest tapped layer, is always split evenly."""
    zero1: bool = True
    """Engine 'pipeline': shard the optimizer state over data parallel (ZeRO-1)."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage for both engines."""
    zero_persistence_threshold: int = 100_000
    """Parameters smaller than this stay whole on every rank under ZeRO-3 (DeepSpeed's default)."""
    zero3_leaf_blocks: bool = True
    """Under ZeRO-3, gather each transformer block's parameters whole in one hook pair (DeepSpeed leaf modules)
    instead of around each of its ~20 submodules. Applied to every network but the discriminator: DeepSpeed
    reduces a leaf's gradients from a module backward hook, which also fires when the generator's update
    back-propagates through the frozen D, and corrupts D's next gradient reduction."""
    deepspeed_bf16: str = "params"
    """How the DeepSpeed engine runs precision=bf16: 'params' (DeepSpeed's bf16 mode: bf16 parameters,
    gradients and activations, fp32 master weights in the optimizer) or 'autocast' (DeepSpeed's torch_autocast:
    fp32 parameters and gradients, bf16 matrix products under torch.autocast, linear weights gathered in bf16;
    the torch and pipeline engines' recipe, so the engines compute the same numbers; tools/plan.py counts the
    bf16 mode's memory)."""
    deepspeed_config: str | None = None
    """A standard DeepSpeed JSON merged over the config the trainer builds for each engine (e.g.
    examples/ds_configs/zero3_bf16.json): ZeRO buckets, prefetching, offload, communication. Keys the trainer
    controls (micro-batch, accumulation, train_batch_size, precision, ZeRO stage, clipping, optimizer) may only
    restate its values. --dry-run prints the merged JSON."""
    activation_checkpointing: bool = True
    """Recompute activations in the backward pass instead of keeping them (see checkpoint_scope)."""
    checkpoint_scope: str = "block"
    """What activation checkpointing recomputes: 'block' (every transformer block whole: the least memory) or
    'mlp' (selective: only each block's MLPs; everything else is kept, so the attention kernel, the costly
    part at long sequences, is not run twice) or 'attention' (selective: the whole block but its attention
    kernel, whose output is kept: one more D-wide tensor per block than 'block', and no attention run twice)."""
    compile: bool = False
    """torch.compile each block."""

    @property
    def recompute(self):
        """activation_checkpointing and checkpoint_scope as one value: False, 'block', 'mlp' or 'attention'."""
        return checkpointing(self.activation_checkpointing, self.checkpoint_scope)


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class OptimSection:
    lr: float = 5e-6
    """Learning rate of G (and D unless d_lr is set). Paper: 5e-6 images, 3e-6 videos."""
    d_lr: float | None = None
    """Discriminator learning rate; None = lr."""
    optimizer: str = "rmsprop"
    """'rmsprop' (§3.5: RMSProp with alpha 0.9, torch's, which has no bias correction), 'adam' (the Adam
    that §3.5 calls equivalent: beta1 0, beta2 = alpha, with bias correction; torch's RMSProp makes the first
    update ~3.2x larger, sqrt(1 / (1 - alpha)), and the first ~20 of an APT stage's ~300 updates larger than
    Adam's) or 'adamw' (with `betas`, for pretraining)."""
    alpha: float = 0.9
    """RMSProp smoothing constant (and beta2 of 'adam')."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas (flow-matching pretraining)."""
    eps: float = 1e-8
    """Optimizer epsilon."""
    weight_decay: float = 0.0
    """No weight decay in the paper."""
    grad_clip: float = 0.0
    """Gradient clipping norm; 0 = none (the paper uses none; DeepSpeed's default of 1.0 is overridden)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    schedule: str = "constant"
    """Learning rate after the warmup: 'constant' (the paper's APT stages) or 'cosine' (decays to min_lr at
    the last step; pretraining the toy diffusion model)."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class APTSection:
    r1_lambda: float = 100.0
    """Weight of the approximated R1 (paper: 100)."""
    r1_sigma: float = 0.01
    """sigma of the aR1 perturbation N(x, sigma I) (Eq. 9; paper: 0.01 images, 0.1 videos)."""
    r1_sigma_means: str = "variance"
    """How sigma is read. The paper calls sigma "a small variance" (§3.4), so 'variance' (the default) perturbs
    with noise of standard deviation sqrt(sigma): 0.1 for images, 0.32 for videos; 'std' uses sigma itself as
    the standard deviation (10x and 3.2x smaller). The toy reproduction compares the two."""
    timestep_shift: float = 1.0
    """Discriminator timestep-ensemble shift s (paper: 1 images, 12 videos)."""
    use_r1: bool = True
    """false only for the paper's Fig. 5 ablation."""
    ema_decay: float = 0.995
    """EMA decay of the generator (paper: 0.995)."""
    d_steps_per_g_step: int = 1
    """Discriminator updates per generator update (the paper alternates 1:1)."""
    collapse_d_loss: float = 0.05
    """A discriminator adversarial loss below this for `collapse_patience` steps is reported as collapse."""
    collapse_patience: int = 20
    """Steps the D loss must stay under collapse_d_loss before the warning."""
    rollback_on_collapse: bool = False
    """On collapse, reload the last checkpoint instead of only warning."""


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class FlowSection:
    shift: float | None = None
    """Timestep shift for flow-matching training; None = resolution dependent sqrt(tokens / 256) (SD3)."""
    text_dropout: float = 0.1
    """Probability of dropping the caption (for classifier-free guidance)."""
    ema_warmup: bool = True
    """Ramp the EMA decay as min(decay, (1 + n) / (10 + n)) at update n. Without it, after 2,700 updates at
    0.999 the EMA still holds 7% of the random initial weights (measured on the toy model: its x0 error at
    t = 1 was 0.143 against 0.084 with that share removed)."""


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class CDSection:
    cfg_scale: float = 7.5
    """Constant classifier-free guidance of the teacher (paper: 7.5)."""
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """[lo, hi]: the teacher's guidance applies where t_n is in (lo, hi], its conditional velocity alone elsewhere.
    The paper's guidance is constant over t: [0, 1]. A pixel-space toy teacher saturates under CFG 7.5 at high
    noise; limiting the interval (docs/toy_reproduction.md) keeps the scale and drops those steps."""
    num_steps: int = 25
    """Discrete timesteps of the consistency distillation grid."""
    ema_decay: float = 0.95
    """EMA decay of the target network."""
    negative_prompt: str = ""
    """The fixed negative prompt of the teacher's CFG (§3.2): encoded once, the way the data set's captions were
    (byte tokens, a tokenizer or a text encoder; see text_encoder), it is the unconditional input of every
    teacher pass. The paper does not print its prompt. Empty (the default) = the null text: zero features,
    fully masked, what the model saw under text dropout."""
    text_encoder: str | None = None
    """The text encoder (hidden-state data sets) or tokenizer (token-id data sets made with --tokenizer)
    directory that encoded the data set's captions; needed to encode a non-empty negative prompt unless the
    captions are byte tokens."""
    shift: float = 3.0
    """Shift of the timestep grid."""


# a field and its docstring per option, as in every config dataclass here: their lines look alike by design
@dataclass
class TrainConfig:
    stage: str = "apt_image"
    """'flow' (flow-matching pretraining), 'cd' (consistency distillation), 'apt_image', 'apt_video'."""
    run_dir: str = "runs/debug"
    """Run folder: checkpoints, metrics.jsonl, the resolved config, samples."""
    seed: int = 1234
    """Seed of all randomness (data order, noise, timesteps)."""
    steps: int = 10
    """Optimizer updates (of G for APT)."""
    global_batch: int = 8
    """Samples per update, exactly, over all data-parallel ranks (paper: 9062 images, 2048 videos)."""
    micro_batch: int = 2
    """Samples per rank per forward pass."""
    precision: str = "bf16"
    """'bf16' (mixed precision, the paper) or 'fp32'."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    save_final: bool = True
    """Write the final checkpoint and the exports when the run ends (false: a benchmark that only times the
    steps; a 2b G + D checkpoint with optimizer state is ~40 GB)."""
    async_save: bool = False
    """Write checkpoints in a background thread: the step waits only while the state is copied to host memory
    (a 2b G + D checkpoint, 39 GiB, took 68-79 s to write on one H200 machine). The next save, the export and
    the end of the run wait for the write; its error, if any, is raised there."""
    keep_checkpoints: int = 2
    """Most recent step-N folders kept."""
    log_every: int = 1
    """Log every N steps."""
    sample_every: int = 0
    """Write a one-step sample grid every N steps (0 = never)."""
    max_bad_steps: int = 3
    """A step whose loss or gradient norm is not finite skips its update (on every rank); after this many
    such steps in a row the run stops with an error, saving and exporting nothing (weights that are not
    finite are never written). Resuming starts from the last checkpoint."""
    wandb_project: str | None = None
    """wandb project; None = no wandb. The run id is kept in run_dir/wandb_run_id: a resumed run continues it."""
    wandb_mode: str | None = None
    """online, offline or disabled; None = $WANDB_MODE if set, else online when logged in (wandb login /
    WANDB_API_KEY), offline otherwise."""
    log_all_ranks: bool = False
    """Log INFO lines on every rank (default: rank 0 only, the others at WARNING; also
    MEGATRON_APT_LOG_ALL_RANKS=1)."""
    plots: bool = True
    """Write PNG plots of metrics.jsonl to run_dir/plots at the end of training (tools/plot_run.py)."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    apt: APTSection = field(default_factory=APTSection)
    flow: FlowSection = field(default_factory=FlowSection)
    cd: CDSection = field(default_factory=CDSection)

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"unknown stage {self.stage!r}; known: {', '.join(STAGES)}")
        self._check_ranges()
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.parallel.engine not in ("deepspeed", "torch", "pipeline"):
            raise ConfigError(f"parallel.engine must be deepspeed, torch or pipeline, got {self.parallel.engine!r}")
        uses_ema = self.stage != "flow" or self.apt.ema_decay > 0
        if self.parallel.engine == "deepspeed" and self.parallel.zero_stage != 3 and uses_ema:
            raise ConfigError(f"parallel.zero_stage={self.parallel.zero_stage}: the EMA this stage keeps is implemented "
                             "for DeepSpeed ZeRO-3 only (use parallel.zero_stage=3, or parallel.engine=torch/pipeline)")
        if self.parallel.pp < 1:
            raise ConfigError(f"parallel.pp must be >= 1, got {self.parallel.pp}")
        if self.parallel.pp > 1 and self.parallel.engine != "pipeline":
            raise ConfigError(f"parallel.pp={self.parallel.pp} needs parallel.engine=pipeline (DeepSpeed's ZeRO-2/3 "
                             "do not combine with pipeline stages; the pipeline engine shards optimizer state, ZeRO-1)")
        if self.parallel.engine == "pipeline" and self.parallel.sp > 1:
            raise ConfigError("parallel.engine=pipeline does not combine with Ulysses sequence parallel (sp > 1) yet")
        if self.parallel.pipeline_layers is not None and len(self.parallel.pipeline_layers) != self.parallel.pp:
            raise ConfigError(f"parallel.pipeline_layers {self.parallel.pipeline_layers} must list one block count per "
                             f"pipeline stage (pp={self.parallel.pp})")
        if not self.data.synthetic and not self.data.path:
            raise ConfigError("data.path is required (or set data.synthetic=true)")
        if self.optim.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule must be constant or cosine, got {self.optim.schedule!r}")
        if self.optim.optimizer not in ("rmsprop", "adam", "adamw"):
            raise ConfigError(f"optim.optimizer must be rmsprop, adam or adamw, got {self.optim.optimizer!r}")
        if self.apt.r1_sigma_means not in ("variance", "std"):
            raise ConfigError(f"apt.r1_sigma_means must be variance or std, got {self.apt.r1_sigma_means!r}")
        if self.model.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got "
                              f"{self.model.attention_backend!r}")
        if self.parallel.recompute == "attention":
            p = self.parallel
            if self.model.attention_backend in ("math", "flash_attn"):
                raise ConfigError(f"parallel.checkpoint_scope=attention keeps the outputs of PyTorch's fused attention "
                                  f"kernels; model.attention_backend={self.model.attention_backend} runs none, so its "
                                  "attention would be recomputed anyway (use auto, cudnn, flash or efficient)")
            non_leaf = "the discriminator's" if self.stage.startswith("apt") else None
            non_leaf = "every model's" if not p.zero3_leaf_blocks else non_leaf
            if p.engine == "deepspeed" and p.zero_stage == 3 and non_leaf:
                raise ConfigError(f"parallel.checkpoint_scope=attention does not combine with DeepSpeed ZeRO-3 where "
                                  f"{non_leaf} blocks are not ZeRO-3 leaf modules: their parameter gathering runs "
                                  "inside the selectively checkpointed block and differs in the recompute (use "
                                  "checkpoint_scope=block, parallel.engine=torch or pipeline, or zero_stage < 3)")
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"wandb_mode must be online, offline or disabled (or null), got {self.wandb_mode!r}")
        if self.parallel.deepspeed_config and not Path(self.parallel.deepspeed_config).is_file():
            raise ConfigError(f"parallel.deepspeed_config: {self.parallel.deepspeed_config} does not exist")


    def _check_ranges(self) -> None:
        """Numbers outside their meaningful range, named with the key and the value."""
        d, p, o, a, c = self.data, self.parallel, self.optim, self.apt, self.cd
        rules = [
            ("steps", self.steps, self.steps >= 0, ">= 0"),
            ("global_batch", self.global_batch, self.global_batch >= 1, ">= 1"),
            ("micro_batch", self.micro_batch, self.micro_batch >= 1, ">= 1"),
            ("save_every", self.save_every, self.save_every >= 0, ">= 0"),
            ("keep_checkpoints", self.keep_checkpoints, self.keep_checkpoints >= 1, ">= 1"),
            ("log_every", self.log_every, self.log_every >= 1, ">= 1"),
            ("sample_every", self.sample_every, self.sample_every >= 0, ">= 0"),
            ("max_bad_steps", self.max_bad_steps, self.max_bad_steps >= 1, ">= 1"),
            ("data.synthetic_shape", d.synthetic_shape, len(d.synthetic_shape) == 4 and min(d.synthetic_shape) >= 1,
             "four sizes [C, T, H, W], each >= 1"),
            ("data.synthetic_text_len", d.synthetic_text_len, d.synthetic_text_len >= 1, ">= 1"),
            ("data.synthetic_size", d.synthetic_size, d.synthetic_size >= 1, ">= 1"),
            ("data.max_text_len", d.max_text_len, d.max_text_len >= 1, ">= 1"),
            ("parallel.tp", p.tp, p.tp >= 1, ">= 1"),
            ("parallel.sp", p.sp, p.sp >= 1, ">= 1"),
            ("parallel.pp", p.pp, p.pp >= 1, ">= 1"),
            ("parallel.pipeline_layers", p.pipeline_layers,
             p.pipeline_layers is None or (len(p.pipeline_layers) > 0 and min(p.pipeline_layers) >= 1),
             "block counts >= 1"),
            ("parallel.checkpoint_scope", p.checkpoint_scope, p.checkpoint_scope in CHECKPOINT_SCOPES,
             " or ".join(repr(v) for v in CHECKPOINT_SCOPES)),
            ("parallel.zero_stage", p.zero_stage, p.zero_stage in (0, 1, 2, 3), "0, 1, 2 or 3"),
            ("parallel.zero_persistence_threshold", p.zero_persistence_threshold, p.zero_persistence_threshold >= 0,
             ">= 0"),
            ("parallel.deepspeed_bf16", p.deepspeed_bf16, p.deepspeed_bf16 in DEEPSPEED_BF16, " or ".join(
                repr(v) for v in DEEPSPEED_BF16)),
            ("optim.lr", o.lr, o.lr >= 0, ">= 0"),
            ("optim.d_lr", o.d_lr, o.d_lr is None or o.d_lr >= 0, ">= 0"),
            ("optim.alpha", o.alpha, 0 <= o.alpha < 1, "in [0, 1)"),
            ("optim.betas", o.betas, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two values in [0, 1)"),
            ("optim.eps", o.eps, o.eps > 0, "> 0"),
            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
            ("optim.grad_clip", o.grad_clip, o.grad_clip >= 0, ">= 0"),
            ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
            ("optim.min_lr", o.min_lr, o.min_lr >= 0, ">= 0"),
            ("model.head_layers", self.model.head_layers,
             self.model.head_layers is None or (len(self.model.head_layers) > 0 and min(self.model.head_layers) >= 1),
             "1-based layer numbers"),
            ("apt.r1_lambda", a.r1_lambda, a.r1_lambda >= 0, ">= 0"),
            ("apt.r1_sigma", a.r1_sigma, a.r1_sigma >= 0, ">= 0"),
            ("apt.timestep_shift", a.timestep_shift, a.timestep_shift > 0, "> 0"),
            ("apt.ema_decay", a.ema_decay, 0 <= a.ema_decay < 1, "in [0, 1)"),
            ("apt.d_steps_per_g_step", a.d_steps_per_g_step, a.d_steps_per_g_step >= 1, ">= 1"),
            ("apt.collapse_patience", a.collapse_patience, a.collapse_patience >= 1, ">= 1"),
            ("flow.shift", self.flow.shift, self.flow.shift is None or self.flow.shift > 0, "> 0"),
            ("flow.text_dropout", self.flow.text_dropout, 0 <= self.flow.text_dropout <= 1, "in [0, 1]"),
            ("cd.num_steps", c.num_steps, c.num_steps >= 1, ">= 1"),
            ("cd.ema_decay", c.ema_decay, 0 <= c.ema_decay < 1, "in [0, 1)"),
            ("cd.shift", c.shift, c.shift > 0, "> 0"),
            ("cd.guidance_interval", c.guidance_interval,
             len(c.guidance_interval) == 2 and 0 <= c.guidance_interval[0] < c.guidance_interval[1] <= 1,
             "[lo, hi] with 0 <= lo < hi <= 1"),
        ]
        for key, value, ok, want in rules:
            if not ok:
                raise ConfigError(f"{key} must be {want}, got {value!r}")
        try:
            get_model_config(self.model.preset, **self.model.overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.preset={self.model.preset!r} with model.overrides {self.model.overrides}: "
                              f"{e}") from None


# The paper's numbers per stage (§3.2, §3.5), applied over the dataclass defaults before the YAML file and the
# overrides, so that `stage=apt_video` alone is the paper's video stage. Flow matching and consistency
# distillation have no batch or learning rate in the paper: they keep the dataclass defaults.
PAPER = {
    "apt_image": {"steps": 350, "global_batch": 9062, "optim.optimizer": "rmsprop", "optim.alpha": 0.9,
                  "optim.lr": 5e-6, "optim.weight_decay": 0.0, "optim.grad_clip": 0.0, "apt.r1_lambda": 100.0,
                  "apt.r1_sigma": 0.01, "apt.timestep_shift": 1.0, "apt.ema_decay": 0.995},
    "apt_video": {"steps": 300, "global_batch": 2048, "optim.optimizer": "rmsprop", "optim.alpha": 0.9,
                  "optim.lr": 3e-6, "optim.weight_decay": 0.0, "optim.grad_clip": 0.0, "apt.r1_lambda": 100.0,
                  "apt.r1_sigma": 0.1, "apt.timestep_shift": 12.0, "apt.ema_decay": 0.995},
    "cd": {"cd.cfg_scale": 7.5},
    "flow": {"optim.optimizer": "adamw"},
}


def stage_defaults(stage: str) -> dict[str, Any]:
    """The paper's values of a stage as dotted keys (see PAPER)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    return dict(PAPER.get(stage, {}))


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return out


class ConfigError(ValueError):
    """A configuration value, key or file the trainer cannot use; its message is one line."""


def _type_name(typ: Any) -> str:
    """How an error names a field's type: 'an int', 'a list of int', 'a float or null', ..."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or origin is types.UnionType:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        what = "list of" if origin is list or Ellipsis in args else f"list of {len(args)}"
        items = {int: "ints", float: "numbers", str: "strings", bool: "bools"}
        return f"a {what} {items.get(inner[0], _type_name(inner[0]))}" if inner else "a list"
    return {int: "an int", float: "a finite float", bool: "a bool (true/false)", str: "a string", list: "a list",
            dict: "a mapping"}.get(typ, getattr(typ, "__name__", str(typ)))


class _Bad(Exception):
    pass


def _typed(value: Any, typ: Any) -> Any:
    """`value` (from YAML, or a command-line string already read as YAML) as the field type `typ`; raises _Bad."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _typed(value, a)
            except _Bad:
                pass
        raise _Bad
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise _Bad
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:  # PyYAML reads 1e5 as a string
                    f = float(value)
                except ValueError:
                    raise _Bad from None
                if math.isfinite(f) and f == int(f):
                    return int(f)
        raise _Bad
    if typ is float:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, (int, float)):
            f = float(value)
        elif isinstance(value, str):  # PyYAML reads 3e-6 (no dot) as a string
            try:
                f = float(value.strip())
            except ValueError:
                raise _Bad from None
        else:
            raise _Bad
        if not math.isfinite(f):
            raise _Bad
        return f
    if typ is str:
        if isinstance(value, str):
            return value
        raise _Bad
    if typ is list or origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Bad
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and Ellipsis not in args and inner and len(value) != len(inner):
            raise _Bad
        if not inner:
            return list(value)
        out = [_typed(v, inner[i] if origin is tuple and Ellipsis not in args else inner[0])
               for i, v in enumerate(value)]
        return out  # tuples as lists: the resolved config is written as YAML
    if typ is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Bad
        return dict(value)
    return value


def _parse_cli(text: str, typ: Any, key: str) -> Any:
    """A command-line value read like a YAML value: `[16,26]`, `16,26` or `16` for a list, `null`, `1e-5`,
    `{num_layers: 6}`; string fields take the text as it is."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    optional = (origin is typing.Union or origin is types.UnionType) and type(None) in args
    base = [a for a in args if a is not type(None)][0] if optional else typ
    if optional and text.strip().lower() in ("null", "none", "~"):
        return None
    if base is str:
        return text
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        value = text
    is_list = base is list or typing.get_origin(base) in (list, tuple)
    if is_list and not isinstance(value, list):
        try:  # 16,26 or 16: the list's items without brackets
            value = yaml.safe_load(f"[{text}]")
        except yaml.YAMLError:
            raise ConfigError(f"cannot parse {key}={text!r}: expected {_type_name(typ)}") from None
    return value


def _check(value: Any, typ: Any, key: str, shown: Any = None) -> Any:
    try:
        return _typed(value, typ)
    except _Bad:
        shown = repr(value) if shown is None else shown
        raise ConfigError(f"cannot parse {key}={shown}: expected {_type_name(typ)}") from None


def _dict_entries(data: dict[str, Any], schema: type, where: str, from_cli: bool) -> dict[str, Any]:
    """Keys and values of a mapping field whose keys are another dataclass's fields (model.overrides:
    MMDiTConfig), checked against that dataclass."""
    hints = typing.get_type_hints(schema)
    out = {}
    for k, v in data.items():
        if k not in hints:
            raise ConfigError(f"unknown config key '{where}{k}'; known keys here: {', '.join(hints)}")
        raw = v
        if from_cli and isinstance(v, str):
            v = _parse_cli(v, hints[k], f"{where}{k}")
        out[k] = _check(v, hints[k], f"{where}{k}", repr(raw))
    return out


def _apply(obj: Any, data: dict[str, Any], where: str, from_cli: bool = False) -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(f"unknown config key '{where}{key}'; known keys here: {', '.join(fields)}")
        cur = getattr(obj, key)
        name = f"{where}{key}"
        if dataclasses.is_dataclass(cur):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name} is a section; give a mapping, got {value!r}")
            _apply(cur, value, f"{name}.", from_cli)
            continue
        raw = value
        if from_cli and isinstance(value, str):
            value = _parse_cli(value, hints[key], name)
        value = _check(value, hints[key], name, repr(raw))
        schema = fields[key].metadata.get("schema")
        if schema is not None and isinstance(value, dict):
            value = _dict_entries(value, schema, f"{name}.", from_cli=False)
        setattr(obj, key, value)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Dotted `key.sub=value` overrides; a mapping field takes one entry as `key.sub.entry=value`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        obj, where = cfg, ""
        while len(parts) > 1 and dataclasses.is_dataclass(getattr(obj, parts[0], None)):
            obj, where, parts = getattr(obj, parts[0]), f"{where}{parts[0]}.", parts[1:]
        if len(parts) > 1:  # into a mapping field: model.overrides.num_layers=6
            names = [f.name for f in dataclasses.fields(obj)]
            fld = next((f for f in dataclasses.fields(obj) if f.name == parts[0]), None)
            if fld is None:
                raise ConfigError(f"unknown config key '{where}{parts[0]}'; known keys here: {', '.join(names)}")
            if not isinstance(getattr(obj, parts[0]), dict) or len(parts) > 2:
                raise ConfigError(f"unknown config key '{where}{'.'.join(parts)}': {where}{parts[0]} has no "
                                  "sub-keys")
            schema = fld.metadata.get("schema")
            entry = {parts[1]: value}
            if schema is not None:
                entry = _dict_entries(entry, schema, f"{where}{parts[0]}.", from_cli=True)
            else:
                entry = {parts[1]: _parse_cli(value, Any, f"{where}{'.'.join(parts)}")}
            setattr(obj, parts[0], {**getattr(obj, parts[0]), **entry})
            continue
        _apply(obj, {parts[0]: value}, where, from_cli=True)
    return cfg


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents; a syntax error names the file, line and column in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a text file ({e.reason})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
def _final_stage(data: dict[str, Any], overrides: list[str]) -> str:
    stage = data.get("stage", TrainConfig.stage)
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "stage":
            stage = value.strip()
    return str(stage)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Dataclass defaults, then the paper's values of the stage (PAPER), then the YAML file, then overrides."""
    cfg = TrainConfig()
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
    _apply(cfg, _nest(stage_defaults(_final_stage(data, overrides or []))), "")
    if path is not None:
        try:
            _apply(cfg, data, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
