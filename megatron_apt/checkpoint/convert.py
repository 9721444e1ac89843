"""Offline checkpoint conversions (no process groups, no DeepSpeed, nothing unpickled).

* `consolidate`: a training checkpoint `RUN/checkpoints/step-N` (DeepSpeed ZeRO-3 flat partitions or plain
  torch tensors, on every tensor-parallel rank) -> consolidated model directories, raw or EMA.
* `reshard` / `load_tp_shard`: a model directory <-> N tensor-parallel shard files.
* `make_apt_init`: the APT starting point: the generator from the consistency-distilled G-hat, the
  discriminator from the original diffusion weights plus fresh cross-attention heads.
* `export_generator`: the one-step generator as an inference checkpoint (kind "generator").

How a training checkpoint is laid out (written by `Trainer.save_checkpoint`): `trainer.json` names the
engines and their model configs; every global rank r wrote `rank{r:05d}.safetensors` and
`rank{r:05d}.json` (its tensor-parallel rank, its ZeRO rank and, per engine, the layout of its tensors).

ZeRO-3 (deepspeed/runtime/zero/partition_parameters.py `_partition_param`, stage3.py
`_create_fp16_partitions_with_defragmentation`): a parameter of n elements is padded to a multiple of the
ZeRO group size Z, partition size pn = ceil(n / Z), and ZeRO rank z holds elements [z*pn, (z+1)*pn) of the
flattened, padded parameter. The flat tensor of a sub-group is the concatenation of that rank's chunks in
the sub-group's parameter order; the fp32 master (`master.i`) and its EMA (`ema.i`) have the same layout.

Tensor parallel: why plain concatenation and not megatron-core `dist_checkpointing`. `dist_checkpointing`
saves and loads its own sharded format through `sharded_state_dict()` with the process groups initialised
(replica ids and the load-time resharding come from `parallel_state`); our training checkpoints are
DeepSpeed flat partitions, not that format, and the conversions here must run on a laptop without
process groups. The split itself is the simplest megatron-core has: `parallel/tensor_parallel.py` builds
every Column/RowParallelLinear weight as `full.chunk(tp, dim)[tp_rank]` with `partition_stride = 1` (no
fused QKV, no interleaved GLU halves), so the full tensor is exactly `torch.cat(shards, partition_dim)` in
tp_rank order, and a shard is the same `chunk` again. Replicated tensors (embeddings, adaLN, norms, the
discriminator heads) are identical on every tensor-parallel rank.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_apt.checkpoint import integrity
from megatron_apt.checkpoint.integrity import CheckpointError
from megatron_apt.config.model import DiscriminatorConfig, MMDiTConfig, get_model_config
from megatron_apt.checkpoint.model_dir import CONFIG_NAME, FORMAT, WEIGHTS_NAME
from megatron_apt.utils import atomic_directory, check_plain_name, get_logger, progress

log = get_logger("megatron_apt.checkpoint")

TRAINER_META = "trainer.json"
SHARD_NAME = "model-tp{rank}-of-{tp}.safetensors"
GENERATOR_KINDS = ("generator", "consistency")  # a consistency model at t = 1 is a one-step generator (Eq. 5)
DIFFUSION_KINDS = ("diffusion",)
MAX_FORWARD_PARAMS = 2_000_000_000  # --verify runs a CPU forward only below this size
# the trainer builds fresh discriminator heads from torch.Generator().manual_seed(seed + 17) (methods/adversarial.py)
HEAD_SEED_OFFSET = 17
DEFAULT_SEED = 1234  # TrainConfig.seed

Echo = Callable[[str], None]


class ConversionError(ValueError):
    """Bad conversion input or output; the command line reports it on stderr and exits with status 2."""


class VerificationError(RuntimeError):
    """--verify found a difference; nothing was written (verification runs before the output is committed)."""


def _quiet(_msg: str) -> None:
    return None


# ---- small readers -------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}): truncated or corrupt?") from e


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for truncated / corrupt files
        raise ConversionError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from e


def _read_tensors(path: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"weights file {path} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys()) if names is None else list(names)
            have = set(f.keys())
            missing = [k for k in keys if k not in have]
            if missing:
                raise ConversionError(f"{path} has no tensor(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
            return {k: f.get_tensor(k) for k in keys}
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from e


def _numel(shape: Iterable[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ConversionError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return table[name]


def _dtype_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({str(v.dtype).replace("torch.", "") for v in state.values()})


def check_preset(model_cfg: dict[str, Any], preset: str | None, what: str) -> None:
    """Raise unless the model config equals the named preset's (every field)."""
    if not preset:
        return
    want = get_model_config(preset).to_dict()
    have = MMDiTConfig.from_dict(model_cfg).to_dict()
    diff = [f"{k} {have.get(k)!r} (preset {want[k]!r})" for k in sorted(want) if have.get(k) != want[k]]
    if diff:
        more = " ..." if len(diff) > 6 else ""
        raise ConversionError(f"{what} is not a {preset!r} model: {', '.join(diff[:6])}{more}")


def check_output(output: str | Path, inputs: Iterable[str | Path], overwrite: bool) -> Path:
    """Refuse an output that exists (without overwrite) or that overlaps an input: inputs are never modified."""
    out = Path(output).resolve()
    for i in inputs:
        src = Path(i).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ConversionError(f"output {output} overlaps the input {i}; write it elsewhere "
                                  "(inputs are never modified)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output path {output} already exists (pass --overwrite to replace it)")
    return Path(output)


# ---- model shapes --------------------------------------------------------------------------------------
def head_mlp_ratio_from(shapes: dict[str, Any], hidden: int, prefix: str = "") -> float:
    shp = shapes.get(f"{prefix}heads.0.mlp.fc1.weight")
    return float(shp[0]) / hidden if shp is not None else DiscriminatorConfig().head_mlp_ratio


def build_meta_model(cfg: MMDiTConfig, kind: str, head_layers=None, head_mlp_ratio: float = 4.0):
    """The model of a checkpoint on the meta device (shapes only, no memory)."""
    from megatron_apt.models.discriminator import Discriminator
    from megatron_apt.models.mmdit import MMDiT

    with torch.device("meta"):
        model = MMDiT(cfg)
        if kind == "discriminator":
            model = Discriminator(model, DiscriminatorConfig(head_layers=tuple(head_layers) if head_layers else None,
                                                             head_mlp_ratio=head_mlp_ratio))
    return model


def expected_shapes(cfg: MMDiTConfig, kind: str, head_layers=None, head_mlp_ratio: float = 4.0) -> dict[str, tuple]:
    model = build_meta_model(cfg, kind, head_layers, head_mlp_ratio)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple], what: str) -> None:
    from megatron_apt.models.discriminator import check_head_layout

    try:
        check_head_layout(state, what)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{what} does not match its model config: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ConversionError(f"{what}: tensor {k} has shape {tuple(state[k].shape)}, the model config "
                                  f"expects {tuple(shape)} (mismatched shapes)")


def model_buffers(cfg: MMDiTConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's persistent buffers, recomputed from the config. ZeRO-3 checkpoints hold only the optimiser's
    parameters; the one buffer the MMDiT has is SD3's fixed sin-cos position table."""
    if cfg.pos_embed != "sincos2d":
        return {}
    from megatron_apt.models.mmdit import get_2d_sincos_table

    table = get_2d_sincos_table(cfg.hidden_size, cfg.pos_embed_max_size, cfg.pos_embed_base_size)
    return {f"{prefix}pos_table": table[None].to(torch.float32).contiguous()}


def count_parameters(state: dict[str, torch.Tensor], cfg: MMDiTConfig, kind: str, head_layers=None,
                     head_mlp_ratio: float = 4.0) -> int:
    model = build_meta_model(cfg, kind, head_layers, head_mlp_ratio)
    names = {n for n, _ in model.named_parameters()}
    return sum(v.numel() for k, v in state.items() if k in names)


# ---- tensor parallel -----------------------------------------------------------------------------------
_BLOCK_PARAM = re.compile(r"^(?:backbone\.)?blocks\.\d+\.(.+)\.(weight|bias)$")


def tp_partition_dim(name: str) -> int:
    """The dim along which `parallelize_mmdit` splits this tensor across tensor-parallel ranks, -1 if
    replicated (mirrors parallel/tensor_parallel.py: column-parallel weight and bias on dim 0, row-parallel
    weight on dim 1 with its bias replicated, everything else replicated)."""
    from megatron_apt.parallel.tensor_parallel import BLOCK_PLAN

    m = _BLOCK_PARAM.match(name)
    if not m:
        return -1
    kind = dict(BLOCK_PLAN).get(m.group(1))
    if kind == "column":
        return 0
    if kind == "row":
        return 1 if m.group(2) == "weight" else -1
    return -1


def tp_partition_dims(names: Iterable[str]) -> dict[str, int]:
    return {n: tp_partition_dim(n) for n in names}


def _check_divisible(state: dict[str, torch.Tensor], dims: dict[str, int], tp: int) -> None:
    for k, v in state.items():
        d = dims.get(k, -1)
        if d >= 0 and v.shape[d] % tp:
            raise ConversionError(f"tensor {k} of shape {tuple(v.shape)} cannot be split {tp} ways along dim {d} "
                                  f"(choose a tensor-parallel size that divides the head count and MLP width)")


def split_tp_shard(state: dict[str, torch.Tensor], tp: int, tp_rank: int,
                   dims: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """This tensor-parallel rank's local tensors of a full state dict (the runtime's `chunk(tp, dim)[rank]`)."""
    if not 0 <= tp_rank < tp:
        raise ConversionError(f"tensor-parallel rank {tp_rank} is outside 0..{tp - 1}")
    dims = dims if dims is not None else tp_partition_dims(state)
    _check_divisible(state, dims, tp)
    out = {}
    for k, v in state.items():
        d = dims.get(k, -1)
        out[k] = v.chunk(tp, dim=d)[tp_rank].contiguous() if d >= 0 and tp > 1 else v
    return out


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], dims: dict[str, int], what: str = "shards",
                    check_replicas: bool = True) -> dict[str, torch.Tensor]:
    """Full tensors from per-rank local tensors: concatenation along each tensor's partition dim in rank order."""
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if set(s) != set(keys):
            raise ConversionError(f"{what}: tensor-parallel rank {r} holds other tensors than rank 0 "
                                  f"(differ: {sorted(set(s) ^ set(keys))[:5]})")
    out = {}
    for k in keys:
        d = dims.get(k, -1)
        parts = [s[k] for s in shards]
        if d >= 0:
            ref = list(parts[0].shape)
            for r, p in enumerate(parts):
                other = list(p.shape)
                if len(other) != len(ref) or any(a != b for i, (a, b) in enumerate(zip(other, ref)) if i != d):
                    raise ConversionError(f"{what}: tensor {k} has shape {tuple(p.shape)} on tensor-parallel rank {r} "
                                          f"and {tuple(parts[0].shape)} on rank 0 (mismatched shapes)")
            out[k] = torch.cat(parts, dim=d)
        else:
            if check_replicas:
                for r, p in enumerate(parts[1:], 1):
                    if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                        raise ConversionError(f"{what}: replicated tensor {k} differs between tensor-parallel "
                                              f"ranks 0 and {r}")
            out[k] = parts[0]
    return out


# ---- model directories (consolidated or tensor-parallel sharded) ---------------------------------------
def read_model_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    meta = _read_json(path / CONFIG_NAME, "model config")
    if meta.get("format") != FORMAT or "model" not in meta:
        raise ConversionError(f"{path / CONFIG_NAME} is not a megatron_apt model config (no format/model keys)")
    return meta


def check_kind(meta: dict[str, Any], path, kinds: str | tuple[str, ...] | None) -> None:
    if kinds is None:
        return
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if meta.get("kind") not in kinds:
        raise ConversionError(f"{path} holds a {meta.get('kind')!r} checkpoint, expected one of {kinds} "
                              "(kind mismatch)")


def model_dir_files(path: str | Path, meta: dict[str, Any]) -> list[Path]:
    tp = meta.get("tp", 1)
    if not isinstance(tp, int) or isinstance(tp, bool) or not 1 <= tp <= 65536:  # read from a file: checked
        raise ConversionError(f"{Path(path) / CONFIG_NAME}: 'tp' must be a shard count, got {tp!r}")
    if tp > 1:
        return [Path(path) / SHARD_NAME.format(rank=r, tp=tp) for r in range(tp)]
    return [Path(path) / WEIGHTS_NAME]


def _meta_model_args(meta: dict[str, Any], shapes: dict[str, Any] | None = None):
    cfg = MMDiTConfig.from_dict(meta["model"])
    kind = meta.get("kind", "diffusion")
    ratio = meta.get("head_mlp_ratio")
    if kind == "discriminator" and ratio is None and shapes is not None:
        ratio = head_mlp_ratio_from(shapes, cfg.hidden_size)
    return cfg, kind, meta.get("head_layers"), float(ratio if ratio is not None else 4.0)


def read_model_state(path: str | Path, expect_kind=None,
                     check: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, full state dict) of a model directory, consolidated (model.safetensors) or tensor-parallel
    sharded (model-tp{r}-of-{N}.safetensors); shapes are checked against the config."""
    path = Path(path)
    meta = read_model_meta(path)
    check_kind(meta, path, expect_kind)
    files = model_dir_files(path, meta)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"model directory {path} is missing {', '.join(missing)} (missing shard)")
    if len(files) == 1:
        state = _read_tensors(files[0])
    else:
        dims = meta.get("partition_dims")
        if not isinstance(dims, dict):
            raise ConversionError(f"{path / CONFIG_NAME} says tp={meta['tp']} but has no partition_dims")
        state = merge_tp_shards([_read_tensors(f) for f in files], {k: int(v) for k, v in dims.items()}, what=str(path))
    if check:
        cfg, kind, layers, ratio = _meta_model_args(meta, {k: v.shape for k, v in state.items()})
        check_state(state, expected_shapes(cfg, kind, layers, ratio), str(path))
    return meta, state


def _model_meta(kind: str, cfg: MMDiTConfig | dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    model = cfg.to_dict() if isinstance(cfg, MMDiTConfig) else dict(cfg)
    return {**(extra or {}), "format": FORMAT, "kind": kind, "model": model}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_model_files(directory: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a consolidated model directory's files into `directory` (inside an atomic_directory block)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    _write_json(directory / CONFIG_NAME, meta)


def _instantiate(meta: dict[str, Any], state: dict[str, torch.Tensor], device="cpu", dtype=torch.float32):
    cfg, kind, layers, ratio = _meta_model_args(meta, {k: v.shape for k, v in state.items()})
    model = build_meta_model(cfg, kind, layers, ratio)
    check_state(state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "state")
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype)


def load_discriminator(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The APT discriminator (`Discriminator`: backbone + heads) of a model directory of kind
    "discriminator" (written by consolidate, make_apt_init or the trainer's export)."""
    meta, state = read_model_state(path, expect_kind="discriminator")
    return _instantiate(meta, state, device, dtype)


def load_model(path: str | Path, device="cpu", dtype=torch.float32, expect_kind=None):
    """Any model directory (consolidated or sharded): an MMDiT, or a Discriminator for kind discriminator."""
    meta, state = read_model_state(path, expect_kind=expect_kind)
    return _instantiate(meta, state, device, dtype)


def load_tp_shard(path: str | Path, tp_rank: int, tp: int | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of tensor-parallel rank `tp_rank` for a model that `parallelize_mmdit` split `tp` ways
    (default: the directory's own tp). Loads into such a model with `load_state_dict` (strict): the keys
    are the model's own (megatron-core adds its empty `_extra_state` itself). `prefix` is prepended to
    every key (e.g. "backbone." for a OneStepGenerator)."""
    path = Path(path)
    meta = read_model_meta(path)
    have = int(meta.get("tp", 1))
    tp = have if tp is None else int(tp)
    if tp < 1:
        raise ConversionError(f"tp must be >= 1, got {tp}")
    if have > 1 and tp == have:
        if not 0 <= tp_rank < tp:
            raise ConversionError(f"tensor-parallel rank {tp_rank} is outside 0..{tp - 1}")
        f = model_dir_files(path, meta)[tp_rank]
        if not f.is_file():
            raise ConversionError(f"model directory {path} is missing {f.name} (missing shard)")
        local = _read_tensors(f)
    else:
        _meta, full = read_model_state(path)
        local = split_tp_shard(full, tp, tp_rank)
    return {prefix + k: v for k, v in local.items()}


# ---- training checkpoints ------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A `step-N` checkpoint directory from itself or from a run directory (its latest complete one)."""
    return checkpoint_candidates(path)[0]


def checkpoint_candidates(path: str | Path) -> list[Path]:
    """[the checkpoint] for a `step-N` directory; a run directory's complete checkpoints, newest first."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if (p / TRAINER_META).is_file():
        return [p]
    ck = p / "checkpoints"
    if ck.is_dir():
        done = integrity.complete_checkpoints(ck)
        if done:
            return done
        raise ConversionError(f"run directory {p} has no complete checkpoint under {ck}")
    if (p / CONFIG_NAME).is_file():
        raise ConversionError(f"{p} is a model directory, not a training checkpoint")
    if p.name.startswith("step-") or any(p.glob("rank*.safetensors")):
        raise ConversionError(f"checkpoint {p} has no {TRAINER_META}: incomplete (its write was interrupted?)")
    raise ConversionError(f"{p} is neither a run directory (with checkpoints/step-N) nor a checkpoint "
                          f"(with {TRAINER_META})")


@dataclass
class EngineLayout:
    name: str
    kind: str  # "zero3", "torch" or "pipeline"
    zero_world: int
    by_tp: list[list[int]]  # global ranks per tp_rank, in zero-rank order (pipeline: every rank of that tp_rank)
    stages: list[list[int]] | None = None  # pipeline: per tp_rank, one rank per pipeline stage (stage order)


class TrainingCheckpoint:
    """A trainer checkpoint, read offline from its rank files. Construction checks that every rank's files
    are present and readable, and that the ranks cover the tensor-parallel x ZeRO grid."""

    def __init__(self, path: str | Path):
        # every file is checked against the sizes and checksums recorded at save; for a run directory a
        # damaged latest checkpoint gives a warning naming the file and the previous one is used
        damaged = []
        for cand in checkpoint_candidates(path):
            try:
                meta = integrity.verify_checkpoint(cand)
                break
            except CheckpointError as e:
                damaged.append(str(e))
                log.warning("%s; trying the previous checkpoint", e)
        else:
            raise CheckpointError(f"no intact checkpoint in {path}: " + "; ".join(damaged))
        self.path = cand
        self.meta = meta
        if "models" not in meta or "world_size" not in meta:
            raise ConversionError(f"{self.path / TRAINER_META} has no 'models' / 'world_size': written by a trainer "
                                  "that did not record the offline layout; resume it once with the current trainer")
        fp = meta.get("fingerprint", {})
        layout = fp.get("layout") or [meta.get("tp", 1), meta.get("sp", 1), None, 1]
        self.pp = int(layout[3]) if len(layout) > 3 and layout[3] else 1
        self.stage = fp.get("stage")
        self.step = int(meta.get("step", -1))
        self.world = int(meta["world_size"])
        self.tp = int(meta.get("tp", 1))
        self.ranks: list[dict[str, Any]] = []
        self.keys: list[set[str]] = []
        for r in range(self.world):
            j, s = self.rank_json(r), self.rank_file(r)
            for f in (j, s):
                if not f.is_file():
                    raise ConversionError(f"checkpoint {self.path} is missing the shard of rank {r} ({f.name}); "
                                          f"it was written by {self.world} ranks")
            info = _read_json(j, "rank layout")
            if int(info.get("rank", -1)) != r or "engines" not in info:
                raise ConversionError(f"{j} does not describe rank {r}")
            self.ranks.append(info)
            self.keys.append(set(_safetensors_keys(s)))
        self.layouts = {e: self._engine_layout(e) for e in self.engines}
        self.bar = None  # a progress bar counting the parameter tensors gathered from rank files, when set
        self._counting = False

    # ---- description ----
    def rank_file(self, r: int) -> Path:
        return self.path / f"rank{r:05d}.safetensors"

    def rank_json(self, r: int) -> Path:
        return self.path / f"rank{r:05d}.json"

    @property
    def engines(self) -> list[str]:
        return list(self.meta["models"])

    def _need(self, engine: str) -> None:
        if engine not in self.meta["models"]:
            raise ConversionError(f"checkpoint {self.path} has no model {engine!r}; it holds {self.engines}")

    def config(self, engine: str) -> MMDiTConfig:
        self._need(engine)
        return MMDiTConfig.from_dict(self.meta["models"][engine]["model"])

    def kind(self, engine: str) -> str:
        """Kind of the consolidated model: generator / discriminator (APT), diffusion (flow), consistency (cd)."""
        self._need(engine)
        if engine == "model":
            return "consistency" if self.stage == "cd" else "diffusion"
        default = {"G": "generator", "D": "discriminator"}.get(engine, "diffusion")
        return self.meta["models"][engine].get("kind") or default

    def head_layers(self, engine: str) -> list[int] | None:
        self._need(engine)
        return self.meta["models"][engine].get("head_layers")

    def has_ema(self, engine: str) -> bool:
        return all(f"{engine}.ema.0" in k for k in self.keys)

    def layout_shapes(self, engine: str) -> dict[str, list[int]]:
        """Tensor-parallel local shapes of tp_rank 0 (all its pipeline stages), by parameter name."""
        lay = self.ranks[0]["engines"][engine]
        if lay["kind"] == "zero3":
            return {p[0]: p[1] for g in lay["groups"] for p in g}
        if lay["kind"] == "pipeline":
            return {p[0]: p[1] for r in self.layouts[engine].stages[0] for p in self.ranks[r]["engines"][engine]["params"]}
        return {p[0]: p[1] for p in lay["params"]}

    def head_mlp_ratio(self, engine: str) -> float:
        shapes = self.layout_shapes(engine)
        return head_mlp_ratio_from(shapes, self.config(engine).hidden_size)

    def _pipeline_layout(self, engine: str) -> EngineLayout:
        """Pipeline stages: each (tp_rank, pp_rank) needs at least one rank; data-parallel replicas of it must
        hold identical parameters (checked by --verify)."""
        by: dict[int, dict[int, list[int]]] = {}
        for r, info in enumerate(self.ranks):
            lay = info["engines"].get(engine)
            if lay is None or lay.get("kind") != "pipeline":
                raise ConversionError(f"model {engine!r}: unknown or mixed engine layouts (rank {r} is not 'pipeline')")
            t, s = int(info.get("tp_rank", 0)), int(lay.get("pp_rank", info.get("pp_rank", 0)))
            if not 0 <= t < self.tp or not 0 <= s < self.pp:
                raise ConversionError(f"{self.rank_json(r)}: tp_rank {t} / pp_rank {s} outside tp={self.tp}, pp={self.pp}")
            by.setdefault(t, {}).setdefault(s, []).append(r)
        if sorted(by) != list(range(self.tp)):
            raise ConversionError(f"model {engine!r}: tensor-parallel ranks {sorted(by)} present, expected 0..{self.tp - 1}")
        for t, st in by.items():
            if sorted(st) != list(range(self.pp)):
                raise ConversionError(f"model {engine!r}: tp_rank {t} has pipeline stages {sorted(st)}, expected "
                                      f"0..{self.pp - 1} (missing shard?)")
        stages = [[by[t][s][0] for s in range(self.pp)] for t in range(self.tp)]
        return EngineLayout(engine, "pipeline", 1, [sorted(r for s in by[t].values() for r in s) for t in range(self.tp)],
                            stages)

    def _engine_layout(self, engine: str) -> EngineLayout:
        if any(info["engines"].get(engine, {}).get("kind") == "pipeline" for info in self.ranks):
            return self._pipeline_layout(engine)
        kinds = set()
        by_tp: dict[int, dict[int, int]] = {}
        zero_world = 1
        for r, info in enumerate(self.ranks):
            lay = info["engines"].get(engine)
            if lay is None:
                raise ConversionError(f"{self.rank_json(r)} has no layout for model {engine!r}")
            kinds.add(lay.get("kind"))
            t, z = int(info.get("tp_rank", 0)), int(info.get("zero_rank", 0))
            if not 0 <= t < self.tp:
                raise ConversionError(f"{self.rank_json(r)}: tp_rank {t} is outside 0..{self.tp - 1}")
            if lay.get("kind") == "zero3":
                zero_world = int(lay["zero_world"])
                if z in by_tp.setdefault(t, {}):
                    raise ConversionError(f"ranks {by_tp[t][z]} and {r} both claim tp_rank {t}, zero_rank {z}")
            by_tp.setdefault(t, {}).setdefault(z, r)
        if len(kinds) != 1 or next(iter(kinds)) not in ("zero3", "torch"):
            raise ConversionError(f"model {engine!r}: unknown or mixed engine layouts {sorted(map(str, kinds))}")
        kind = next(iter(kinds))
        if sorted(by_tp) != list(range(self.tp)):
            raise ConversionError(f"model {engine!r}: tensor-parallel ranks {sorted(by_tp)} present, "
                                  f"expected 0..{self.tp - 1}")
        if kind == "zero3":
            for t, zs in by_tp.items():
                if sorted(zs) != list(range(zero_world)):
                    raise ConversionError(f"model {engine!r}: tp_rank {t} has ZeRO ranks {sorted(zs)}, expected "
                                          f"0..{zero_world - 1} (missing shard?)")
        return EngineLayout(engine, kind, zero_world, [[zs[z] for z in sorted(zs)] for t, zs in sorted(by_tp.items())])

    # ---- consolidation ----
    def _tensor(self, r: int, key: str) -> torch.Tensor:
        if key not in self.keys[r]:
            raise ConversionError(f"{self.rank_file(r)} has no tensor {key} (the rank's layout names it)")
        t = _read_tensors(self.rank_file(r), [key])[key]
        if self.bar is not None and self._counting:
            self.bar.update(1)
        return t

    def planned_reads(self, engine: str) -> int:
        """How many rank-file tensors gathering `engine`'s parameters reads (tp_local_states; the progress bar's
        total)."""
        lay = self.layouts[engine]
        if lay.kind == "zero3":
            return sum(len(self.ranks[rs[0]]["engines"][engine]["groups"]) * len(rs) for rs in lay.by_tp)
        pre = f"{engine}.param."
        ranks = [r for st in lay.stages for r in st] if lay.kind == "pipeline" else [rs[0] for rs in lay.by_tp]
        total = 0
        for r in ranks:
            named = {p[0] for p in self.ranks[r]["engines"][engine]["params"]}
            total += len(named) + sum(1 for k in self.keys[r] if k.startswith(pre) and k[len(pre):] not in named)
        return total

    def _zero3_local(self, engine: str, t: int, ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        lay = self.layouts[engine]
        ranks = lay.by_tp[t]
        Z = lay.zero_world
        groups = self.ranks[ranks[0]]["engines"][engine]["groups"]
        for r in ranks[1:]:
            other = self.ranks[r]["engines"][engine]["groups"]
            if other != groups:
                raise ConversionError(f"model {engine!r}: rank {r}'s ZeRO layout differs from rank {ranks[0]}'s "
                                      "(mismatched shapes)")
        what = "ema" if ema else "master"
        state, dims = {}, {}
        for gi, group in enumerate(groups):
            want = sum(int(p[2]) for p in group)
            flats = []
            for r in ranks:
                flat = self._tensor(r, f"{engine}.{what}.{gi}")
                if flat.dim() != 1 or flat.numel() != want:
                    raise ConversionError(f"{self.rank_file(r)}: {engine}.{what}.{gi} has shape "
                                          f"{tuple(flat.shape)}, its layout needs ({want},) (mismatched shapes)")
                flats.append(flat)
            off = 0
            for name, shape, pn, dim in group:
                n, pn = _numel(shape), int(pn)
                if pn != -(-n // Z):
                    raise ConversionError(f"model {engine!r}: {name} of shape {tuple(shape)} has partition size {pn}, "
                                          f"ZeRO over {Z} ranks gives {-(-n // Z)} (mismatched shapes)")
                full = torch.cat([f[off:off + pn] for f in flats])[:n]
                state[name] = full.view(*shape).clone()
                dims[name] = int(dim)
                off += pn
        return state, dims

    def _pipeline_local(self, engine: str, t: int, ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The union of the stages' parameters (each stage names them as the full model does)."""
        state, dims = {}, {}
        for r in self.layouts[engine].stages[t]:
            s, d = self._torch_local(engine, t, ema, rank=r)
            twice = set(s) & set(state)
            if twice:
                raise ConversionError(f"model {engine!r}: pipeline stages both hold {sorted(twice)[:3]} (overlapping "
                                      "stages)")
            state.update(s)
            dims.update(d)
        return state, dims

    def _torch_local(self, engine: str, t: int, ema: bool, rank: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        r = self.layouts[engine].by_tp[t][0] if rank is None else rank
        params = self.ranks[r]["engines"][engine]["params"]
        pre = f"{engine}.param."
        state, dims = {}, {}
        for j, (name, shape, dim) in enumerate(params):
            v = self._tensor(r, f"{engine}.ema.{j}" if ema else f"{pre}{name}")
            if list(v.shape) != list(shape):
                raise ConversionError(f"{self.rank_file(r)}: {name} has shape {tuple(v.shape)}, its layout says "
                                      f"{tuple(shape)} (mismatched shapes)")
            state[name], dims[name] = v, int(dim)
        named = {p[0] for p in params}
        for k in sorted(self.keys[r]):  # buffers (state_dict entries that are not parameters)
            if k.startswith(pre) and k[len(pre):] not in named:
                state[k[len(pre):]] = self._tensor(r, k)
        return state, dims

    def tp_local_states(self, engine: str, ema: bool = False) -> tuple[list[dict[str, torch.Tensor]], dict[str, int]]:
        """Per tensor-parallel rank, the full (ZeRO-gathered) local parameters; and their partition dims."""
        self._need(engine)
        if ema and not self.has_ema(engine):
            raise ConversionError(f"checkpoint {self.path}: model {engine!r} has no EMA (use the raw weights)")
        fn = {"zero3": self._zero3_local, "pipeline": self._pipeline_local}.get(self.layouts[engine].kind,
                                                                                 self._torch_local)
        locals_, dims = [], {}
        for t in range(self.tp):
            self._counting = True
            try:
                s, d = fn(engine, t, ema)
            finally:
                self._counting = False
            if dims and d != dims:
                raise ConversionError(f"model {engine!r}: tensor-parallel rank {t} lists other parameters than rank 0")
            locals_.append(s)
            dims = d
        return locals_, dims

    def state_dict(self, engine: str, ema: bool = False,
                   buffers: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The consolidated fp32 state dict of an engine's module (keys as the trainer's module names them,
        e.g. `backbone.*` for G and D), checked against the model config. Buffers a ZeRO-3 checkpoint does
        not hold are taken from `buffers` (by MMDiT name, e.g. "pos_table") or recomputed from the config."""
        locals_, dims = self.tp_local_states(engine, ema)
        state = merge_tp_shards(locals_, dims, what=f"checkpoint {self.path} model {engine!r}", check_replicas=False)
        prefix = "backbone." if engine in ("G", "D") or all(k.startswith("backbone.") for k in state) else ""
        r0 = self.layouts[engine].by_tp[0][0]
        for k, v in model_buffers(self.config(engine), prefix).items():
            if k in state:
                continue
            given = (buffers or {}).get(k[len(prefix):])  # an explicit --buffers-from wins over the checkpoint
            if given is None and f"{engine}.buffer.{k}" in self.keys[r0]:  # the trainer saves "{engine}.buffer.{name}"
                state[k] = self._tensor(r0, f"{engine}.buffer.{k}").to(torch.float32)
                continue
            if given is not None and tuple(given.shape) != tuple(v.shape):
                raise ConversionError(f"buffer {k[len(prefix):]} has shape {tuple(given.shape)} where the checkpoint's "
                                      f"model needs {tuple(v.shape)} (mismatched shapes)")
            state[k] = given.to(torch.float32) if given is not None else v
        return state

    def recomputed_buffers(self, engine: str, buffers: dict[str, torch.Tensor] | None = None) -> list[str]:
        """Buffers that consolidation recomputes from the config (not in the checkpoint, not given)."""
        if self.layouts[engine].kind != "zero3":
            return []
        r0 = self.layouts[engine].by_tp[0][0]
        held = {k.split(".buffer.", 1)[1].removeprefix("backbone.") for k in self.keys[r0]
                if k.startswith(f"{engine}.buffer.")}
        return [k for k in model_buffers(self.config(engine)) if k not in (buffers or {}) and k not in held]

    def product_state(self, engine: str, ema: bool = False, state: dict[str, torch.Tensor] | None = None):
        """What a model directory holds: G without its wrapper's `backbone.` prefix, D with every key."""
        state = self.state_dict(engine, ema) if state is None else state
        kind = self.kind(engine)
        if kind != "discriminator" and state and all(k.startswith("backbone.") for k in state):
            state = {k[len("backbone."):]: v for k, v in state.items()}
        check_state(state, expected_shapes(self.config(engine), kind, self.head_layers(engine),
                                           self.head_mlp_ratio(engine)),
                    f"checkpoint {self.path} model {engine!r}")
        return state

    def describe(self) -> str:
        parts = []
        for e in self.engines:
            lay = self.layouts[e]
            zero = f" over {lay.zero_world} ZeRO ranks" if lay.kind == "zero3" else ""
            parts.append(f"{e} ({self.kind(e)}, {lay.kind}{zero}" + (", +EMA" if self.has_ema(e) else "") + ")")
        return (f"checkpoint {self.path} (stage {self.stage}, step {self.step}, {self.world} ranks, tp {self.tp}, pp {self.pp}): "
                + ", ".join(parts))

    # ---- verification ----
    def check_against_rank_files(self, engine: str, ema: bool, state: dict[str, torch.Tensor]) -> int:
        """Split a consolidated state (keys as `state_dict` returns them) again into every rank's tensors and
        compare with the rank files bit for bit (padding excluded). Returns the number of rank tensors checked."""
        checked = 0
        lay = self.layouts[engine]
        what = "ema" if ema else "master"
        for t, ranks in enumerate(lay.by_tp):
            for z, r in enumerate(ranks):
                rl = self.ranks[r]["engines"][engine]
                if lay.kind == "zero3":
                    for gi, group in enumerate(rl["groups"]):
                        flat = self._tensor(r, f"{engine}.{what}.{gi}")
                        off = 0
                        for name, shape, pn, dim in group:
                            full = state[name]
                            local = full.chunk(self.tp, dim=dim)[t] if dim >= 0 and self.tp > 1 else full
                            vals = local.reshape(-1)
                            start = z * pn
                            n = max(0, min(vals.numel() - start, pn))
                            if not torch.equal(flat[off:off + n], vals[start:start + n]):
                                raise VerificationError(f"{name}: the consolidated tensor does not reproduce rank "
                                                        f"{r}'s partition (tp_rank {t}, zero_rank {z})")
                            off += pn
                        checked += 1
                else:
                    for j, (name, shape, dim) in enumerate(rl["params"]):
                        v = self._tensor(r, f"{engine}.ema.{j}" if ema else f"{engine}.param.{name}")
                        full = state[name]
                        local = full.chunk(self.tp, dim=dim)[t] if dim >= 0 and self.tp > 1 else full
                        if not torch.equal(v, local):
                            raise VerificationError(f"{name}: the consolidated tensor does not reproduce rank {r}'s "
                                                    f"copy (tp_rank {t}; data-parallel replicas must be identical)")
                        checked += 1
        return checked


# ---- forward probes (--verify) -------------------------------------------------------------------------
def probe_inputs(cfg: MMDiTConfig, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = cfg.patch_size
    side = min(4, cfg.pos_embed_max_size)
    x = torch.randn(2, cfg.in_channels, pt, side * ph, side * pw, generator=g)
    t = torch.rand(2, generator=g)
    text = torch.randn(2, 5, cfg.text_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g) if cfg.pooled_dim else None
    return {"x": x, "t": t, "text": text, "pooled": pooled}


@torch.no_grad()
def probe_forward(model, kind: str, seed: int = 0) -> torch.Tensor:
    """One small fp32 CPU forward: G(z) for generators, v(x, t) for diffusion models, D's logit."""
    from megatron_apt.models.discriminator import OneStepGenerator

    cfg = model.config if hasattr(model, "config") else model.backbone.config
    i = probe_inputs(cfg, seed)
    model = model.float().eval()
    if kind in GENERATOR_KINDS:
        return OneStepGenerator(model)(i["x"], i["text"], pooled=i["pooled"])
    return model(i["x"], i["t"], i["text"], pooled=i["pooled"])


FORWARD_TOL = 1e-5


def forward_error(out: torch.Tensor, ref: torch.Tensor, tol: float = FORWARD_TOL) -> float:
    """max |out - ref|, raising above tol * (1 + max |ref|). Bit-identical weights can still give last-bit
    differences: CPU BLAS kernels pick code paths by memory alignment (mmap-ed safetensors vs fresh tensors)."""
    if not torch.isfinite(out).all():
        raise VerificationError("the forward pass gives non-finite values")
    err = (out.float() - ref.float()).abs().max().item()
    if not err <= tol * (1.0 + ref.abs().max().item()):
        raise VerificationError(f"the forward pass differs from the source model's by {err:.3e}")
    return err


def _verify_dir(directory: Path, state: dict[str, torch.Tensor], echo: Echo, label: str,
                reference_model=None) -> None:
    """Reload a written model directory: tensors bit-identical, and (small models) a finite forward that
    equals the reference model's when one is given."""
    meta, back = read_model_state(directory)
    if set(back) != set(state):
        raise VerificationError(f"{label}: reloaded tensors differ in names")
    for k, v in state.items():
        if back[k].dtype != v.dtype or not torch.equal(back[k], v):
            raise VerificationError(f"{label}: reloaded tensor {k} differs from what was written")
    cfg, kind, layers, ratio = _meta_model_args(meta, {k: v.shape for k, v in back.items()})
    n = count_parameters(back, cfg, kind, layers, ratio)
    msg = f"verify {label}: {len(back)} tensors reload bit-identical"
    if n <= MAX_FORWARD_PARAMS:
        model = _instantiate(meta, back)
        out = probe_forward(model, kind)
        if not torch.isfinite(out).all():
            raise VerificationError(f"{label}: the forward pass gives non-finite values")
        msg += f"; CPU forward finite (|out| mean {out.abs().mean().item():.4g})"
        if reference_model is not None:
            err = forward_error(out, probe_forward(reference_model, kind))
            msg += f", max |out - source model's| = {err:.2e}"
    else:
        msg += f"; forward skipped ({n / 1e9:.1f}B parameters)"
    echo(msg)


# ---- reports -------------------------------------------------------------------------------------------
@dataclass
class Written:
    path: Path
    kind: str
    parameters: int
    tensors: int
    dtypes: list[str]
    note: str = ""

    def line(self) -> str:
        return (f"  {self.path}: kind {self.kind}, {self.parameters / 1e6:.3f}M parameters in {self.tensors} tensors, "
                f"dtypes {self.dtypes}" + (f"; {self.note}" if self.note else ""))


@dataclass
class Report:
    title: str
    outputs: list[Written] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [self.title, *(w.line() for w in self.outputs)]
        lines += [f"  changed: {c}" for c in self.changes]
        return "\n".join(lines)


def _written(path: Path, state, meta, note: str = "") -> Written:
    cfg, kind, layers, ratio = _meta_model_args(meta, {k: v.shape for k, v in state.items()})
    return Written(path, kind, count_parameters(state, cfg, kind, layers, ratio), len(state), _dtype_names(state), note)


# ---- consolidate ---------------------------------------------------------------------------------------
def read_buffers(path: str | Path | None) -> dict[str, torch.Tensor] | None:
    """The persistent buffers (by MMDiT name, e.g. "pos_table") of a model directory: for ZeRO-3 checkpoints,
    which hold only parameters, the training run's init model gives the exact tables the run used."""
    if path is None:
        return None
    meta, state = read_model_state(path)
    cfg, kind, layers, ratio = _meta_model_args(meta, {k: v.shape for k, v in state.items()})
    names = {n for n, _ in build_meta_model(cfg, kind, layers, ratio).named_buffers()}
    out = {}
    for n in names:
        short = n[len("backbone."):] if n.startswith("backbone.") else n
        out[short] = state[n]
    return out


_RECOMPUTED_NOTE = ("recomputed from the model config (ZeRO-3 checkpoints hold no buffers; it can differ from an "
                    "imported table in the last bits: --buffers-from INIT_MODEL_DIR copies the run's own)")


PRODUCT_NAMES = {"G": ("generator", "generator_ema"), "D": ("discriminator", "discriminator_ema"),
                 "model": ("model", "model_ema")}


def consolidate(src: str | Path, output: str | Path, model: str | None = None, ema: bool = False,
                dtype: str | torch.dtype | None = None, overwrite: bool = False, expect_preset: str | None = None,
                verify: bool = False, buffers_from: str | Path | None = None, echo: Echo = _quiet) -> Report:
    """A training checkpoint (a step-N directory, or a run directory: its latest) -> model directories.

    With `model` ("G", "D" or "model") `output` is that model's directory (raw weights, or its EMA with
    `ema`). Without it, `output` gets one sub-directory per product, named as the trainer's export names
    them: generator, generator_ema, discriminator (APT); model, model_ema (flow / cd)."""
    ckpt = TrainingCheckpoint(src)
    inputs = [ckpt.path] + ([ckpt.path.parent] if ckpt.path.parent.name == "checkpoints" else [])
    check_output(output, inputs + ([buffers_from] if buffers_from else []), overwrite)
    dt = _dtype(dtype)
    buffers = read_buffers(buffers_from)
    echo(ckpt.describe())
    if model is not None:
        ckpt._need(model)
        if ema and not ckpt.has_ema(model):
            raise ConversionError(f"checkpoint {ckpt.path}: model {model!r} has no EMA "
                                  "(drop --ema for the raw weights)")
        products = [("", model, ema)]
    else:
        if ema:
            raise ConversionError("--ema selects one model's EMA: give --model too (without --model every "
                                  "product, EMA ones included, is written)")
        products = []
        for e in ckpt.engines:
            names = PRODUCT_NAMES.get(e, (e, f"{e}_ema"))
            products.append((names[0], e, False))
            if ckpt.has_ema(e):
                products.append((names[1], e, True))
    for sub, _e, _ema in products:  # names from trainer.json become folder names: plain names only
        if sub:
            check_plain_name(sub, f"checkpoint {ckpt.path}: product name")
    for e in {p[1] for p in products}:
        check_preset(ckpt.meta["models"][e]["model"], expect_preset, f"checkpoint {ckpt.path} model {e!r}")
    report = Report(f"consolidated {ckpt.path} (step {ckpt.step}) -> {output}")
    bar = progress(total=sum(ckpt.planned_reads(e) for _, e, _ in products), desc="consolidate", unit="tensor")
    ckpt.bar = bar
    with bar, atomic_directory(output, overwrite=overwrite) as tmp:
        for sub, e, use_ema in products:
            bar.set_postfix_str(f"{e}{' EMA' if use_ema else ''}", refresh=False)
            full = ckpt.state_dict(e, use_ema, buffers)
            state = ckpt.product_state(e, use_ema, full)
            kind = ckpt.kind(e)
            lay = ckpt.layouts[e]
            extra = {"source": {"checkpoint": str(ckpt.path), "step": ckpt.step, "engine": e, "ema": use_ema,
                                "tp": ckpt.tp, "zero_world": lay.zero_world, "stage": ckpt.stage}}
            if kind == "discriminator":
                extra["head_layers"] = list(ckpt.head_layers(e) or [])
                extra["head_mlp_ratio"] = ckpt.head_mlp_ratio(e)
            meta = _model_meta(kind, ckpt.config(e), extra)
            out_state = {k: v.to(dt) for k, v in state.items()} if dt is not None else state
            d = tmp / sub if sub else tmp
            if d.resolve().parent != tmp.resolve() and d != tmp:  # stays inside --output, whatever the name
                raise ConversionError(f"product {sub!r} would be written outside {output}")
            write_model_files(d, out_state, meta)
            label = f"{e}{' EMA' if use_ema else ''}"
            if verify:
                n = ckpt.check_against_rank_files(e, use_ema, full)
                echo(f"verify {label}: re-partitioned into the checkpoint's layout, {n} rank tensors bit-identical")
                _verify_dir(d, out_state, echo, label)
            report.outputs.append(_written(Path(output) / sub if sub else Path(output), out_state, meta,
                                           f"{label} of step {ckpt.step}"))
            report.changes.append(
                f"{label}: {len(lay.by_tp) * len(lay.by_tp[0])} rank files ({lay.kind}"
                + (f", ZeRO {lay.zero_world}" if lay.kind == "zero3" else "") + f", TP {ckpt.tp}"
                + (f", PP {ckpt.pp}" if ckpt.pp > 1 else "") + f") -> one {WEIGHTS_NAME}"
                + ("; 'backbone.' prefix dropped" if len(state) and next(iter(state)) not in full else "")
                + (f"; cast float32 -> {str(dt).replace('torch.', '')}" if dt not in (None, torch.float32) else "")
                + "".join(f"; {b} {_RECOMPUTED_NOTE}" for b in ckpt.recomputed_buffers(e, buffers))
                + "".join(f"; {b} from {buffers_from}" for b in (buffers or {}) if ckpt.layouts[e].kind == "zero3"))
    return report


# ---- reshard -------------------------------------------------------------------------------------------
_TP_KEYS = ("tp", "partition_dims", "shards")


def reshard(src: str | Path, output: str | Path, tp: int, overwrite: bool = False, expect_preset: str | None = None,
            verify: bool = False, echo: Echo = _quiet) -> Report:
    """A model directory (consolidated or sharded) -> `tp` tensor-parallel shard files
    (model-tp{r}-of-{tp}.safetensors, config with "tp" and every tensor's partition dim), or with tp = 1 a
    consolidated model directory."""
    if tp < 1:
        raise ConversionError(f"--tp must be >= 1, got {tp}")
    check_output(output, [src], overwrite)
    meta, state = read_model_state(src)
    check_preset(meta["model"], expect_preset, str(src))
    have = int(meta.get("tp", 1))
    base = {k: v for k, v in meta.items() if k not in _TP_KEYS}
    dims = tp_partition_dims(state)
    _check_divisible(state, dims, tp)
    cfg = MMDiTConfig.from_dict(meta["model"])
    if tp > 1 and cfg.num_heads % tp:
        raise ConversionError(f"{cfg.num_heads} attention heads are not divisible by tp={tp}")
    report = Report(f"resharded {src} (tp {have}) -> {output} (tp {tp})")
    with atomic_directory(output, overwrite=overwrite) as tmp:
        if tp == 1:
            write_model_files(tmp, state, base)
        else:
            names = [SHARD_NAME.format(rank=r, tp=tp) for r in range(tp)]
            for r, name in enumerate(progress(names, desc="reshard", unit="shard")):
                shard = {k: v.contiguous() for k, v in split_tp_shard(state, tp, r, dims).items()}
                save_file(shard, str(tmp / name), metadata={"format": "pt", "tp": str(tp), "tp_rank": str(r)})
            _write_json(tmp / CONFIG_NAME, {**base, "tp": tp, "shards": names, "partition_dims": dims})
        if verify:
            _meta2, back = read_model_state(tmp)
            for k, v in state.items():
                if not torch.equal(back[k], v):
                    raise VerificationError(f"reshard: tensor {k} does not survive the round trip")
            for r in range(tp):
                local = load_tp_shard(tmp, r)
                want = split_tp_shard(state, tp, r, dims)
                if any(not torch.equal(local[k], want[k]) for k in want):
                    raise VerificationError(f"reshard: shard {r} differs from the runtime split")
            msg = f"verify: {len(state)} tensors reassemble bit-identical from {tp} shard(s)"
            n = count_parameters(state, *_meta_model_args(meta, {k: v.shape for k, v in state.items()}))
            if n <= MAX_FORWARD_PARAMS:
                kind = meta.get("kind")
                out = probe_forward(_instantiate(meta, back), kind)
                err = forward_error(out, probe_forward(_instantiate(meta, state), kind))
                msg += f"; CPU forward of the reassembled model: max |out - source's| = {err:.2e}"
            echo(msg)
    split = sum(1 for d in dims.values() if d >= 0)
    report.outputs.append(_written(Path(output), state, meta, f"tp {tp}"))
    report.changes.append(f"{split} of {len(dims)} tensors split along their partition dim ({have} -> {tp} shards); "
                          f"{len(dims) - split} replicated; values unchanged")
    return report


# ---- APT initialisation --------------------------------------------------------------------------------
def _diff_configs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def fresh_heads(cfg: MMDiTConfig, head_layers=None, head_mlp_ratio: float = 4.0, seed: int = DEFAULT_SEED,
                dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """Fresh discriminator heads (`Discriminator.init_heads`) without materialising the backbone. Drawn from
    torch.Generator().manual_seed(seed + 17), as the APT stage draws them for a run with this seed."""
    model = build_meta_model(cfg, "discriminator", head_layers, head_mlp_ratio)
    for m in (model.heads, model.norm, model.proj):
        m.to_empty(device="cpu")
    model.init_heads(generator=torch.Generator().manual_seed(seed + HEAD_SEED_OFFSET))
    state = {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    return state, tuple(model.head_layers)


def make_apt_init(diffusion: str | Path, consistency: str | Path, output: str | Path, head_layers=None,
                  seed: int = DEFAULT_SEED, head_mlp_ratio: float = 4.0, overwrite: bool = False,
                  expect_preset: str | None = None, verify: bool = False, echo: Echo = _quiet) -> Report:
    """`output/generator` (kind generator: the consistency-distilled G-hat, tensors unchanged) and
    `output/discriminator` (kind discriminator: backbone = the diffusion weights bit for bit, fresh heads)."""
    check_output(output, [diffusion, consistency], overwrite)
    dmeta, dstate = read_model_state(diffusion, expect_kind=DIFFUSION_KINDS)
    cmeta, cstate = read_model_state(consistency, expect_kind=GENERATOR_KINDS)
    check_preset(dmeta["model"], expect_preset, str(diffusion))
    check_preset(cmeta["model"], expect_preset, str(consistency))
    diff = _diff_configs(MMDiTConfig.from_dict(dmeta["model"]).to_dict(),
                         MMDiTConfig.from_dict(cmeta["model"]).to_dict())
    if diff:
        raise ConversionError(f"the diffusion model {diffusion} and the consistency model {consistency} have different "
                              f"shapes (mismatched shapes): {', '.join(diff[:6])}")
    cfg = MMDiTConfig.from_dict(dmeta["model"])
    bdtypes = {v.dtype for v in dstate.values()}
    heads, layers = fresh_heads(cfg, head_layers, head_mlp_ratio, seed,
                                dtype=next(iter(bdtypes)) if len(bdtypes) == 1 else torch.float32)
    dstate_full = {**{f"backbone.{k}": v for k, v in dstate.items()}, **heads}
    gmeta = _model_meta("generator", cmeta["model"], {"source": {"consistency": str(consistency), "apt_init": True}})
    dmeta_out = _model_meta("discriminator", dmeta["model"], {
        "head_layers": list(layers), "head_mlp_ratio": float(head_mlp_ratio),
        "source": {"diffusion": str(diffusion), "apt_init": True, "head_seed": seed + HEAD_SEED_OFFSET}})
    check_state(dstate_full, expected_shapes(cfg, "discriminator", layers, head_mlp_ratio), "discriminator")
    with atomic_directory(output, overwrite=overwrite) as tmp:
        write_model_files(tmp / "generator", cstate, gmeta)
        write_model_files(tmp / "discriminator", dstate_full, dmeta_out)
        if verify:
            _verify_dir(tmp / "generator", cstate, echo, "generator", reference_model=_instantiate(cmeta, cstate))
            _verify_dir(tmp / "discriminator", dstate_full, echo, "discriminator")
            _m, back = read_model_state(tmp / "discriminator")
            if any(not torch.equal(back[f"backbone.{k}"], v) for k, v in dstate.items()):
                raise VerificationError("discriminator backbone differs from the diffusion weights")
            echo(f"verify: discriminator backbone bit-identical to {diffusion} ({len(dstate)} tensors)")
    report = Report(f"APT initialisation -> {output}")
    report.outputs.append(_written(Path(output) / "generator", cstate, gmeta, f"from {consistency}"))
    report.outputs.append(_written(Path(output) / "discriminator", dstate_full, dmeta_out,
                                   f"backbone from {diffusion}, heads at layers {list(layers)}"))
    report.changes.append(f"generator: kind {cmeta.get('kind')!r} -> 'generator', tensors unchanged")
    report.changes.append(f"discriminator: kind {dmeta.get('kind')!r} -> 'discriminator', 'backbone.' prefix added, "
                          f"{len(heads)} fresh head tensors (seed {seed} + {HEAD_SEED_OFFSET})")
    return report


# ---- export the generator ------------------------------------------------------------------------------
def export_generator(src: str | Path, output: str | Path, ema: bool = True, dtype: str | torch.dtype | None = None,
                     overwrite: bool = False, expect_preset: str | None = None, verify: bool = False,
                     buffers_from: str | Path | None = None, echo: Echo = _quiet) -> Report:
    """The one-step generator as an inference model directory (kind "generator") from a run directory (its
    latest checkpoint), a step-N checkpoint (G, or a cd run's consistency model; EMA by default) or a model
    directory of kind generator / consistency."""
    src_p = Path(src)
    dt = _dtype(dtype)
    notes = []
    if (src_p / CONFIG_NAME).is_file():
        check_output(output, [src_p], overwrite)
        meta, state = read_model_state(src_p, expect_kind=GENERATOR_KINDS)
        cfg_dict = meta["model"]
        source = {"model_dir": str(src_p), "kind": meta.get("kind")}
        notes.append(f"from model directory {src_p} (kind {meta.get('kind')!r}; --ema/--raw do not apply)")
    else:
        ckpt = TrainingCheckpoint(src_p)
        inputs = [ckpt.path] + ([ckpt.path.parent] if ckpt.path.parent.name == "checkpoints" else [])
        check_output(output, inputs + ([buffers_from] if buffers_from else []), overwrite)
        echo(ckpt.describe())
        if "G" in ckpt.engines:
            engine = "G"
        elif "model" in ckpt.engines and ckpt.stage == "cd":
            engine = "model"
        else:
            raise ConversionError(f"checkpoint {ckpt.path} (stage {ckpt.stage}) holds no one-step generator "
                                  f"(models {ckpt.engines}; kind mismatch)")
        if ema and not ckpt.has_ema(engine):
            raise ConversionError(f"checkpoint {ckpt.path}: model {engine!r} has no EMA (pass --raw)")
        buffers = read_buffers(buffers_from)
        state = ckpt.product_state(engine, ema, ckpt.state_dict(engine, ema, buffers))
        notes += [f"{b} {_RECOMPUTED_NOTE}" for b in ckpt.recomputed_buffers(engine, buffers)]
        cfg_dict = ckpt.meta["models"][engine]["model"]
        source = {"checkpoint": str(ckpt.path), "step": ckpt.step, "engine": engine, "ema": ema, "stage": ckpt.stage}
        notes.append(f"{engine} {'EMA' if ema else 'raw weights'} of step {ckpt.step}, consolidated from "
                     f"{ckpt.world} rank files (tp {ckpt.tp})")
    check_preset(cfg_dict, expect_preset, str(src_p))
    src_state = state
    if dt is not None:
        state = {k: v.to(dt) for k, v in state.items()}
        notes.append(f"cast to {str(dt).replace('torch.', '')}")
    meta_out = _model_meta("generator", cfg_dict, {"source": source})
    with atomic_directory(output, overwrite=overwrite) as tmp:
        write_model_files(tmp, state, meta_out)
        if verify:
            from megatron_apt.checkpoint.model_dir import load_mmdit

            load_mmdit(tmp, expect_kind=("generator",))  # what generation code does
            ref = _instantiate(meta_out, src_state) if dt in (None, torch.float32) else None
            _verify_dir(tmp, state, echo, "generator", reference_model=ref)
    report = Report(f"exported the one-step generator -> {output}")
    report.outputs.append(_written(Path(output), state, meta_out))
    report.changes += notes
    return report


__all__ = [
    "ConversionError", "TrainingCheckpoint", "VerificationError", "check_preset", "consolidate", "export_generator",
    "fresh_heads", "load_discriminator", "load_model", "load_tp_shard", "make_apt_init", "merge_tp_shards",
    "probe_forward", "read_model_state", "reshard", "resolve_checkpoint", "split_tp_shard", "tp_partition_dim",
    "tp_partition_dims",
]
