"""Training engines: a DeepSpeed ZeRO engine, or plain torch, behind one small interface.

Loss convention: the trainer calls `backward(loss)` with each micro-batch's loss already scaled so that
the per-rank losses of one update, averaged over the data-parallel x sequence-parallel group, give the
loss of the exact global batch (see `trainer.batching`). Engines average gradients over that group and
never rescale by accumulation steps (DeepSpeed: `managed_gradient_accumulation: false`,
`backward(..., scale_wrt_gas=False)`), so ragged micro-batches form an exact global batch.

Non-finite steps: a micro-batch loss that is not finite is turned into NaN gradients (`backward`), and an
update whose gradient norm is not finite is skipped on every rank (`skipped` says so; the EMA does not move).
DeepSpeed's ZeRO optimizer skips such an update itself (its overflow check); the torch engine asks every rank,
the pipeline engine's norm is global already.

EMA: kept like the parameters it follows. Under ZeRO-3 it is one fp32 tensor per flat partition of the
fp32 master weights (this rank's shard only); in the torch engine one fp32 tensor per parameter.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from megatron_apt.parallel import comm


class MegatronMPU:
    """The `mpu` DeepSpeed expects, over megatron-core's groups. Its data-parallel group is the
    data-parallel x sequence-parallel group: ZeRO partitions and averages over it (the Ulysses convention,
    see parallel.comm)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)


def make_optimizer(params, name: str, lr: float, alpha: float, eps: float, weight_decay: float, betas=(0.9, 0.999)):
    params = [p for p in params if p.requires_grad]
    cls, kw = optimizer_class(name, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, betas=betas)
    return cls(params, **kw)


def optimizer_class(name: str, *, lr: float, alpha: float, eps: float, weight_decay: float, betas=(0.9, 0.999)):
    """(torch optimizer class, its keyword arguments) for the configured optimizer (§3.5)."""
    if name == "rmsprop":  # §3.5: RMSProp, alpha 0.9, no weight decay (torch's: no bias correction)
        return torch.optim.RMSprop, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay)
    if name == "adam":  # the Adam §3.5 calls equivalent: beta1 = 0, beta2 = alpha, bias-corrected
        return torch.optim.Adam, dict(lr=lr, betas=(0.0, alpha), eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


class TorchEngine:
    """Plain PyTorch: fp32 master parameters, optional bf16 autocast, gradients averaged over DP x SP."""

    kind = "torch"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, precision: str,
                 group=None):
        self.module = module
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.precision = precision
        self.group = group
        self.ema: list[torch.Tensor] | None = None
        self.skipped = False  # whether the last step() skipped its update (a non-finite loss or gradient norm)

    def __call__(self, *args, **kwargs):
        dev = next(self.module.parameters()).device.type
        ctx = torch.autocast(dev, dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
        with ctx:
            return self.module(*args, **kwargs)

    def raw(self, *args, **kwargs):
        """Forward through the module without the engine's backward bookkeeping: for a model that is frozen
        in this pass (D during G's step) or runs under no_grad (G during D's step). Under DeepSpeed, a pass
        through engine.forward registers that engine's backward hooks on the outputs, and a backward of
        another engine's loss through them corrupts the frozen engine's gradient accounting."""
        return TorchEngine.__call__(self, *args, **kwargs)

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        comm.nan_grads_if_nonfinite(loss).backward()

    def step(self) -> float:
        params = self.params()
        comm.average_gradients(params, self.group)
        norm = grad_norm(params)
        # tensor-parallel ranks hold different gradients: every rank skips if any rank sees a non-finite norm
        self.skipped = not comm.all_ranks_true(math.isfinite(norm), params[0].device if params else "cpu")
        if not self.skipped:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether this rank's weights (and EMA) are all finite."""
        ts = [p for p in self.module.parameters()] + list(self.ema or [])
        return all(bool(torch.isfinite(t).all()) for t in ts)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # ---- EMA ----
    def init_ema(self) -> None:
        self.ema = [p.detach().float().clone() for p in self.module.parameters()]

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        if self.skipped:  # a skipped update leaves the average where it was
            return
        for e, p in zip(self.ema, self.module.parameters()):
            e.lerp_(p.detach().float(), 1.0 - decay)

    @contextlib.contextmanager
    def ema_weights(self):
        """Run the module with its EMA weights inside the block (the consistency-distillation target)."""
        params = list(self.module.parameters())
        saved = [p.data for p in params]
        try:
            for p, e in zip(params, self.ema):
                p.data = e.to(p.dtype)
            yield
        finally:
            for p, d in zip(params, saved):
                p.data = d

    def layout(self) -> dict:
        """How this rank's checkpoint tensors map to parameters (for offline consolidation)."""
        return {"kind": "torch", "params": [[n, list(p.shape), getattr(p, "partition_dim", -1)
                                             if getattr(p, "tensor_model_parallel", False) else -1]
                                            for n, p in self.module.named_parameters()]}

    # ---- checkpoint state (this rank's shard, tensors only) ----
    def _local_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state this rank saves (a sharded optimizer: this rank's shard)."""
        return self.optimizer

    def state_tensors(self) -> dict[str, torch.Tensor]:
        # megatron-core layers add `_extra_state` entries (None) to state_dict: tensors only
        out = {f"param.{n}": p.detach().contiguous() for n, p in self.module.state_dict().items() if torch.is_tensor(p)}
        opt = self._local_optimizer().state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        if self.ema is not None:
            for i, e in enumerate(self.ema):
                out[f"ema.{i}"] = e
        return out

    def load_state_tensors(self, st: dict[str, torch.Tensor]) -> None:
        sd = {k[len("param."):]: v for k, v in st.items() if k.startswith("param.")}
        self.module.load_state_dict(sd)
        local = self._local_optimizer()
        opt = local.state_dict()
        state: dict[int, dict] = {}
        for k, v in st.items():
            if k.startswith("opt."):
                _, i, key = k.split(".", 2)
                state.setdefault(int(i), {})[key] = v
        opt["state"] = state
        local.load_state_dict(opt)
        if any(k.startswith("ema.") for k in st):
            self.ema = [st[f"ema.{i}"].clone() for i in range(len(list(self.module.parameters())))]

    @contextlib.contextmanager
    def full_parameters(self, use_ema: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Full (unsharded over data parallel) parameters of this rank's tensor-parallel shard."""
        sd = {n: p.detach() for n, p in self.module.named_parameters()}
        if use_ema:
            sd = {n: e for (n, _), e in zip(self.module.named_parameters(), self.ema)}
        buffers = {n: b for n, b in self.module.named_buffers()}
        yield {**sd, **buffers}


class DeepSpeedEngine(TorchEngine):
    """A DeepSpeed engine (ZeRO stage from the config) with the same interface."""

    kind = "deepspeed"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, precision: str,
                 zero_stage: int, micro_batch: int, persistence_threshold: int = 100_000,
                 user_config: dict | None = None, user_config_source: str = "the file", leaf_blocks: bool = False,
                 bf16_mode: str = "params"):
        import deepspeed

        from megatron_apt.trainer.ds_config import merged_config, trainer_ds_config

        mpu = MegatronMPU()
        ds_config = trainer_ds_config(micro_batch=micro_batch, grad_clip=grad_clip, precision=precision,
                                      zero_stage=zero_stage, persistence_threshold=persistence_threshold,
                                      bf16_mode=bf16_mode)
        if user_config:  # a user's DeepSpeed JSON (parallel.deepspeed_config) merged over what the trainer needs
            dp = mpu.get_data_parallel_world_size() if dist.is_initialized() else 1
            ds_config = merged_config(ds_config, user_config, dp_size=dp, source=user_config_source)
        self.ds_config = ds_config
        self.leaf_blocks = leaf_blocks and zero_stage == 3
        if self.leaf_blocks:
            # ZeRO-3 installs a gather/release hook pair on every module that holds parameters; as leaves, a
            # block's parameters are gathered once for the whole block (parallel.zero3_leaf_blocks)
            from deepspeed.utils import set_z3_leaf_modules

            from megatron_apt.models.mmdit import MMDiTBlock

            set_z3_leaf_modules(module, [MMDiTBlock])
        engine, opt, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                                 mpu=mpu, dist_init_required=False)
        self.engine = engine
        self.zero_stage = zero_stage
        self._param_masks: list[torch.Tensor] | None = None  # built on first use (_parameter_elements)
        super().__init__(engine.module, opt, grad_clip, precision, group=None)

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(comm.nan_grads_if_nonfinite(loss), scale_wrt_gas=False)

    def step(self) -> float:
        # ZeRO's (and the bf16 optimizer's) step skips the update itself when the global gradient norm (over the
        # ZeRO and model-parallel groups) is not finite: DeepSpeed's overflow handling, the same decision on
        # every rank. A bare optimizer (ZeRO-0 in fp32) checks nothing: then the gradients are checked here and
        # dropped (an update without gradients changes nothing) when any rank's are not finite.
        if not hasattr(self.engine.optimizer, "overflow"):
            params = self.params()
            own = grad_norm(params)  # this rank's, before DeepSpeed averages over data parallel
            self.skipped = not comm.all_ranks_true(math.isfinite(own), params[0].device if params else "cpu")
            if self.skipped:
                for p in params:
                    p.grad = None
            self.engine.step()
            return own
        self.engine.step()
        self.skipped = not self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return float("nan") if self.skipped and math.isfinite(norm) else norm

    @torch.no_grad()
    def weights_finite(self) -> bool:
        zopt = self.engine.optimizer  # the fp32 masters: ZeRO-3's flat partitions, ZeRO-1/2's single partitions
        if self.zero_stage == 3 and getattr(zopt, "fp32_partitioned_groups_flat", None):
            masks = self._parameter_elements()
            ts = [t[m] for t, m in zip(zopt.fp32_partitioned_groups_flat, masks)]
            ts += [e[m] for e, m in zip(self.ema or [], masks)]  # the EMA is laid out as the masters
        else:
            ts = list(getattr(zopt, "single_partition_of_fp32_groups", None) or self.module.parameters())
            ts += list(self.ema or [])
        return all(bool(torch.isfinite(t).all()) for t in ts)

    def _parameter_elements(self) -> list[torch.Tensor]:
        """For each of ZeRO-3's flat master partitions, which elements hold parameters. The last rank's
        partition of a parameter whose size the ranks do not divide is padded to the common size, and DeepSpeed
        leaves the padding as allocated (uninitialised: it may hold NaN or inf, which no step touches)."""
        if self._param_masks is None:
            zopt = self.engine.optimizer
            masks = []
            for group, pads, flat in zip(zopt.fp16_groups, zopt.groups_padding, zopt.fp32_partitioned_groups_flat):
                m = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
                sizes = [p.partition_numel() for p in group]
                if sum(sizes) == flat.numel():  # else (parameters swapped to NVMe) every element is checked
                    end = 0
                    for n, pad in zip(sizes, pads):
                        end += n
                        m[end - pad:end] = False
                masks.append(m)
            self._param_masks = masks
        return self._param_masks

    def set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr

    # ZeRO-3 internals: the fp32 master partitions are flat tensors, one per sub-group
    def _masters(self) -> list[torch.Tensor]:
        return list(self.engine.optimizer.fp32_partitioned_groups_flat)

    def init_ema(self) -> None:
        if self.zero_stage != 3:
            raise NotImplementedError("EMA with DeepSpeed is implemented for ZeRO-3 (use zero_stage=3)")
        self.ema = [m.detach().float().clone() for m in self._masters()]

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        if self.skipped:
            return
        for e, m in zip(self.ema, self._masters()):
            e.lerp_(m.detach().float(), 1.0 - decay)

    def layout(self) -> dict:
        """ZeRO-3 flat partitions: for each sub-group, its parameters in flat order with their full
        (tensor-parallel local) shape, this rank's partition size, and the tensor-parallel split dim.
        DeepSpeed pads every parameter to a multiple of the ZeRO group size and gives rank r the r-th
        chunk; the flat tensor is the concatenation of these chunks."""
        zopt = self.engine.optimizer
        names = {id(p): n for n, p in self.module.named_parameters()}
        groups = []
        for params, parts in zip(zopt.fp16_groups, zopt.fp16_partitioned_groups):
            groups.append([[names[id(p)], list(p.ds_shape), int(part.numel()),
                            getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1]
                           for p, part in zip(params, parts)])
        return {"kind": "zero3", "zero_world": dist.get_world_size(zopt.dp_process_group), "groups": groups}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        zopt = self.engine.optimizer
        out = {}
        for i, m in enumerate(self._masters()):
            out[f"master.{i}"] = m.detach().contiguous()
            for k, v in zopt.optimizer.state.get(m, {}).items():
                out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        if self.ema is not None:
            for i, e in enumerate(self.ema):
                out[f"ema.{i}"] = e
        return out

    @torch.no_grad()
    def _write_masters_to_params(self, flats: list[torch.Tensor]) -> None:
        # parameters a no-grad forward left gathered would keep serving the old values: release them first
        self.engine.empty_partition_cache()
        zopt = self.engine.optimizer
        for i, f in enumerate(flats):
            if f.numel():
                zopt.fp16_partitioned_groups_flat[i].data.copy_(f.data)
            updated = zopt.unflatten(zopt.fp16_partitioned_groups_flat[i], zopt.fp16_partitioned_groups[i])
            for p, q in zip(zopt.fp16_partitioned_groups[i], updated):
                p.data = q.data

    def load_state_tensors(self, st: dict[str, torch.Tensor]) -> None:
        zopt = self.engine.optimizer
        masters = self._masters()
        for i, m in enumerate(masters):
            saved = st[f"master.{i}"]
            if saved.shape != m.shape:
                raise ValueError(f"checkpoint partition {i} has shape {tuple(saved.shape)}, this layout needs "
                                 f"{tuple(m.shape)}: resume needs the same model and parallel layout")
            m.data.copy_(saved)
            state = {k.split(".", 2)[2]: v.clone() for k, v in st.items() if k.startswith(f"opt.{i}.")}
            if state:
                zopt.optimizer.state[m] = state
        self._write_masters_to_params(masters)
        if any(k.startswith("ema.") for k in st):
            self.ema = [st[f"ema.{i}"].clone() for i in range(len(masters))]

    @contextlib.contextmanager
    def ema_weights(self):
        masters = self._masters()
        saved = [m.detach().clone() for m in masters]
        self._write_masters_to_params(self.ema)
        try:
            yield
        finally:
            self._write_masters_to_params(saved)

    @contextlib.contextmanager
    def full_parameters(self, use_ema: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Gather every parameter over the ZeRO group (all ranks must enter). With use_ema the EMA shards
        are swapped in for the duration and the training weights restored after."""
        import deepspeed

        masters = self._masters()
        saved = None
        if use_ema:
            saved = [m.detach().clone() for m in masters]
            self._write_masters_to_params(self.ema)
        try:
            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                sd = {n: p.detach().clone() for n, p in self.module.named_parameters()}
            buffers = {n: b for n, b in self.module.named_buffers()}
            yield {**sd, **buffers}
        finally:
            if saved is not None:
                self._write_masters_to_params(saved)


class PipelineEngine(TorchEngine):
    """One pipeline stage (see `parallel.pipeline`) with its optimizer state sharded over data parallel.

    DeepSpeed refuses ZeRO-2/3 under its pipeline engine, so this layout shards only the optimizer state
    (ZeRO-1) with PyTorch's `ZeroRedundancyOptimizer`: gradients are averaged over the data-parallel group,
    each rank updates the parameters whose optimizer state it holds, and broadcasts them. (megatron-core's
    distributed optimizer does the same with contiguous buffers, but in megatron-core 0.16 it accepts
    only CUDA tensors, and RMSProp is not among its optimizers.) The gradient norm and clipping span the
    whole model: squares are summed over the pipeline x tensor-parallel group, counting a tensor-parallel
    replica once."""

    kind = "pipeline"

    def __init__(self, module: nn.Module, *, optimizer: str, lr: float, alpha: float, eps: float,
                 weight_decay: float, betas, grad_clip: float, precision: str, zero1: bool = True):
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.dp = ps.get_data_parallel_group(with_context_parallel=True)
        self.mp = ps.get_model_parallel_group()
        params = [p for p in module.parameters() if p.requires_grad]
        self.zero1 = zero1 and dist.get_world_size(self.dp) > 1
        if self.zero1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            cls, kw = optimizer_class(optimizer, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, betas=betas)
            opt = ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=self.dp, **kw)
        else:
            opt = make_optimizer(params, optimizer, lr, alpha, eps, weight_decay, betas)
        super().__init__(module, opt, grad_clip, precision, group=self.dp)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("a pipeline stage runs through parallel.pipeline.PipelineRunner, not engine(...)")

    raw = __call__

    def _local_optimizer(self):
        # ZeRO-1: this rank's shard. Its partition is a deterministic function of the parameter list, so a
        # resume with the same layout gives every rank the same parameters again.
        return self.optimizer.optim if self.zero1 else self.optimizer

    def step(self) -> float:
        params = self.params()
        comm.average_gradients(params, self.dp)
        tp_rank = self.ps.get_tensor_model_parallel_rank()
        dev = params[0].device if params else torch.device("cpu")
        parts = [p.grad.detach().double().pow(2).sum() for p in params
                 if p.grad is not None and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
        sq = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=dev)
        if dist.get_world_size(self.mp) > 1:  # one collective, on the parameters' device (NCCL: the GPU)
            dist.all_reduce(sq, group=self.mp)
        norm = float(sq) ** 0.5
        if self.grad_clip > 0 and norm > self.grad_clip:
            coef = self.grad_clip / (norm + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.skipped = not math.isfinite(norm)  # the same decision on every rank: the norm is global
        if not self.skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def layout(self) -> dict:
        lay = super().layout()
        lay.update(kind="pipeline", pp_rank=self.ps.get_pipeline_model_parallel_rank(),
                   pp=self.ps.get_pipeline_model_parallel_world_size())
        return lay


def grad_norm(params) -> float:
    sq = 0.0
    for p in params:
        if p.grad is not None:
            sq += float(p.grad.detach().float().pow(2).sum())
    return sq ** 0.5


def build_engine(module: nn.Module, *, kind: str, optimizer: str, lr: float, alpha: float, eps: float,
                 weight_decay: float, betas, grad_clip: float, precision: str, zero_stage: int, micro_batch: int,
                 persistence_threshold: int = 100_000, zero1: bool = True, deepspeed_config: str | None = None,
                 leaf_blocks: bool = False, deepspeed_bf16: str = "params"):
    from megatron_apt.parallel.state import dp_group

    if kind == "pipeline":
        return PipelineEngine(module, optimizer=optimizer, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                              betas=betas, grad_clip=grad_clip, precision=precision, zero1=zero1)
    opt = make_optimizer(module.parameters(), optimizer, lr, alpha, eps, weight_decay, betas)
    if kind == "deepspeed":
        user = None
        if deepspeed_config:
            from megatron_apt.trainer.ds_config import load_user_config

            user = load_user_config(deepspeed_config)
        return DeepSpeedEngine(module, opt, grad_clip, precision, zero_stage, micro_batch, persistence_threshold,
                               user_config=user, user_config_source=deepspeed_config or "the file",
                               leaf_blocks=leaf_blocks, bf16_mode=deepspeed_bf16)
    group = dp_group(with_sp=True) if dist.is_initialized() and dist.get_world_size() > 1 else None
    return TorchEngine(module, opt, grad_clip, precision, group=group)
