"""Training configuration: dataclasses with a docstring under each field, YAML files, dotted overrides.

    cfg = load_config("examples/configs/apt_video_8b.yaml", ["optim.lr=3e-6", "parallel.tp=2"])

Unknown keys (in YAML or overrides) are errors that name the key and the known ones. The paper's numbers
are the defaults here and in the YAML files, not in code.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("flow", "cd", "apt_image", "apt_video")
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "flash_attn", "efficient", "math")


@dataclass
class ModelSection:
    preset: str = "debug"
    """Size preset from the registry (debug, toy, 2b, 8b, sd3.5-large)."""
    overrides: dict = field(default_factory=dict)
    """MMDiTConfig fields to change on top of the preset."""
    init: str | None = None
    """Model directory to start the generator / student from (flow: optional; cd: the diffusion model;
    apt: the consistency-distilled G-hat, or the image stage's exported EMA generator)."""
    teacher: str | None = None
    """cd: the frozen diffusion teacher; apt: the diffusion weights the discriminator backbone starts from."""
    head_layers: list | None = None
    """APT discriminator head layers (1-based); None = the paper's 16/26/36-of-36 fractions."""
    attention_backend: str = field(default_factory=lambda: os.environ.get("MEGATRON_APT_ATTN", "auto"))
    """Attention kernel: auto (CUDA: cuDNN SDPA first, then flash, memory-efficient, math), cudnn, flash,
    efficient, math (PyTorch SDPA backends) or flash_attn (the flash-attn package). One that this machine cannot
    run is an error; auto's choice is logged. Default: $MEGATRON_APT_ATTN, else auto."""


@dataclass
class DataSection:
    path: str | None = None
    """Prefix of an indexed dataset written by tools/preprocess_video.py; None with synthetic=true."""
    synthetic: bool = False
    """Random latents and text of `synthetic_shape` (tests and throughput runs)."""
    synthetic_shape: list = field(default_factory=lambda: [4, 1, 8, 8])
    """[C, T, H, W] of synthetic latents."""
    synthetic_text_len: int = 8
    """Text tokens per synthetic sample."""
    synthetic_size: int = 64
    """Samples in the synthetic set."""
    latent_scale: float = 1.0
    """Multiplies stored latents/pixels on load (pixels in [-1, 1] usually need none)."""
    max_text_len: int = 64
    """Text tokens kept per sample."""
    preload: bool = False
    """Hold the whole data set in device memory and gather micro-batches there (small data sets such as
    the toy task: large batches of a small model are then limited by the GPU, not by per-sample reads)."""


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
    pipeline_layers: list | None = None
    """Blocks per pipeline stage for G / flow / CD models (e.g. [17, 19]); None = even split. The
    discriminator, cut after its deepest tapped layer, is always split evenly."""
    zero1: bool = True
    """Engine 'pipeline': shard the optimizer state over data parallel (ZeRO-1)."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage for both engines."""
    zero_persistence_threshold: int = 100_000
    """Parameters smaller than this stay whole on every rank under ZeRO-3 (DeepSpeed's default)."""
    deepspeed_config: str | None = None
    """A standard DeepSpeed JSON merged over the config the trainer builds for each engine (e.g.
    examples/ds_configs/zero3_bf16.json): ZeRO buckets, prefetching, offload, communication. Keys the trainer
    controls (micro-batch, accumulation, train_batch_size, precision, ZeRO stage, clipping, optimizer) may only
    restate its values. --dry-run prints the merged JSON."""
    activation_checkpointing: bool = True
    """Recompute each block in the backward pass."""
    compile: bool = False
    """torch.compile each block."""


@dataclass
class OptimSection:
    lr: float = 5e-6
    """Learning rate of G (and D unless d_lr is set). Paper: 5e-6 images, 3e-6 videos."""
    d_lr: float | None = None
    """Discriminator learning rate; None = lr."""
    optimizer: str = "rmsprop"
    """'rmsprop' (paper: alpha 0.9, = Adam beta1 0, beta2 0.9) or 'adamw'."""
    alpha: float = 0.9
    """RMSProp smoothing constant."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
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


@dataclass
class APTSection:
    r1_lambda: float = 100.0
    """Weight of the approximated R1 (paper: 100)."""
    r1_sigma: float = 0.01
    """aR1 perturbation std (paper: 0.01 images, 0.1 videos)."""
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


@dataclass
class CDSection:
    cfg_scale: float = 7.5
    """Constant classifier-free guidance of the teacher (paper: 7.5)."""
    num_steps: int = 25
    """Discrete timesteps of the consistency distillation grid."""
    ema_decay: float = 0.95
    """EMA decay of the target network."""
    negative_prompt: str = ""
    """Fixed negative prompt of the teacher's CFG (its encoding; empty = the null text)."""
    shift: float = 3.0
    """Shift of the timestep grid."""


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
    keep_checkpoints: int = 2
    """Most recent step-N folders kept."""
    log_every: int = 1
    """Log every N steps."""
    sample_every: int = 0
    """Write a one-step sample grid every N steps (0 = never)."""
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
            raise ValueError(f"unknown stage {self.stage!r}; known: {', '.join(STAGES)}")
        if self.global_batch < 1 or self.micro_batch < 1:
            raise ValueError("global_batch and micro_batch must be >= 1")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.parallel.engine not in ("deepspeed", "torch", "pipeline"):
            raise ValueError(f"parallel.engine must be deepspeed, torch or pipeline, got {self.parallel.engine!r}")
        uses_ema = self.stage != "flow" or self.apt.ema_decay > 0
        if self.parallel.engine == "deepspeed" and self.parallel.zero_stage != 3 and uses_ema:
            raise ValueError(f"parallel.zero_stage={self.parallel.zero_stage}: the EMA this stage keeps is implemented "
                             "for DeepSpeed ZeRO-3 only (use parallel.zero_stage=3, or parallel.engine=torch/pipeline)")
        if self.parallel.pp < 1:
            raise ValueError(f"parallel.pp must be >= 1, got {self.parallel.pp}")
        if self.parallel.pp > 1 and self.parallel.engine != "pipeline":
            raise ValueError(f"parallel.pp={self.parallel.pp} needs parallel.engine=pipeline (DeepSpeed's ZeRO-2/3 "
                             "do not combine with pipeline stages; the pipeline engine shards optimizer state, ZeRO-1)")
        if self.parallel.engine == "pipeline" and self.parallel.sp > 1:
            raise ValueError("parallel.engine=pipeline does not combine with Ulysses sequence parallel (sp > 1) yet")
        if self.parallel.pipeline_layers is not None and len(self.parallel.pipeline_layers) != self.parallel.pp:
            raise ValueError(f"parallel.pipeline_layers {self.parallel.pipeline_layers} must list one block count per "
                             f"pipeline stage (pp={self.parallel.pp})")
        if not self.data.synthetic and not self.data.path:
            raise ValueError("data.path is required (or set data.synthetic=true)")
        if self.optim.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be constant or cosine, got {self.optim.schedule!r}")
        if self.optim.optimizer not in ("rmsprop", "adamw"):
            raise ValueError(f"optim.optimizer must be rmsprop or adamw, got {self.optim.optimizer!r}")
        if self.model.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got "
                             f"{self.model.attention_backend!r}")
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"wandb_mode must be online, offline or disabled (or null), got {self.wandb_mode!r}")
        if self.parallel.deepspeed_config and not Path(self.parallel.deepspeed_config).is_file():
            raise ValueError(f"parallel.deepspeed_config: {self.parallel.deepspeed_config} does not exist")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Parse an override string (or a YAML scalar) into the field's type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if not isinstance(value, str):
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value.lower() in ("none", "null"):
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    try:
        if typ is bool:
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if typ in (list, dict) or origin in (list, dict):
            return yaml.safe_load(value)
    except ValueError as e:
        raise ValueError(f"cannot parse {key}={value!r} as {getattr(typ, '__name__', typ)}") from e
    return value


def _apply(obj: Any, data: dict[str, Any], where: str) -> None:
    types = _field_types(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"unknown config key '{where}{key}'; known keys here: {', '.join(names)}")
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key} is a section; give a mapping")
            _apply(cur, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, types[key], f"{where}{key}"))


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        nested: dict[str, Any] = {parts[-1]: value}
        for p in reversed(parts[:-1]):
            nested = {p: nested}
        _apply(cfg, nested, "")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping at the top level")
        _apply(cfg, data, "")
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
