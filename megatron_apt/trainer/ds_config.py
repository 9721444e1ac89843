"""The DeepSpeed configuration of the training engines.

The trainer builds one config per engine from the training config (`trainer_ds_config`). A user's standard
DeepSpeed JSON (`parallel.deepspeed_config=PATH`, e.g. `examples/ds_configs/zero3_bf16.json`) is merged over it
key by key (nested sections merge, the file's value wins), so that ZeRO buckets, prefetching, offload or
communication options can be tuned for a cluster without touching code.

A few keys belong to the trainer, because its loop and checkpoints depend on them (see `engines`): the
micro-batch, no managed gradient accumulation (the trainer accumulates ragged micro-batches into the exact
global batch itself), the precision, the ZeRO stage (the EMA and the checkpoint layout are those of ZeRO-3),
gradient clipping and the optimizer. A file may restate them with the same value; a different value is an
error naming the key, the file's value and the trainer's (and the training-config key that sets it).
Keys starting with "_" are documentation and are dropped.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

_MISSING = object()


def trainer_ds_config(*, micro_batch: int, grad_clip: float, precision: str, zero_stage: int,
                      persistence_threshold: int = 100_000, overlap_comm: bool | None = None,
                      bf16_mode: str = "params") -> dict[str, Any]:
    """The config the trainer builds for each engine (before a user file is merged over it). bf16 runs use
    DeepSpeed's bf16 mode (bf16_mode 'params') or its torch_autocast (fp32 parameters, bf16 products)."""
    if overlap_comm is None:
        import torch

        overlap_comm = torch.cuda.is_available()
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        # DeepSpeed 0.19 clips at 1.0 unless told otherwise; the paper uses no clipping
        "gradient_clipping": float(grad_clip),
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True, "overlap_comm": overlap_comm,
                              "stage3_param_persistence_threshold": persistence_threshold},
        "bf16": {"enabled": precision == "bf16" and bf16_mode == "params"},
        "torch_autocast": {"enabled": precision == "bf16" and bf16_mode == "autocast", "dtype": "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _strip_doc(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_doc(v) for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_"))}
    return obj


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def load_user_config(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON file as a dict (documentation keys starting with "_" dropped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"parallel.deepspeed_config: {p} does not exist")
    try:
        data = json.loads(p.read_text(), object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise ValueError(f"parallel.deepspeed_config: {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"parallel.deepspeed_config: {p} must hold a JSON object, got {type(data).__name__}")
    return _strip_doc(data)


def _get(d: dict[str, Any], dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def check_user_config(built: dict[str, Any], user: dict[str, Any], *, dp_size: int, source: str = "the file"
                      ) -> None:
    """Raise ValueError (one line) where `user` contradicts what the trainer controls in `built`."""
    micro = built["train_micro_batch_size_per_gpu"]
    controlled = [
        ("train_micro_batch_size_per_gpu", micro, "micro_batch"),
        ("gradient_accumulation_steps", 1, "the trainer accumulates micro-batches itself (exact global batch)"),
        ("train_batch_size", micro * dp_size,
         f"micro_batch x {dp_size} data-parallel ranks; the exact global batch is global_batch, planned by the "
         "trainer"),
        ("managed_gradient_accumulation", False, "the trainer accumulates ragged micro-batches itself"),
        ("bf16.enabled", _get(built, "bf16.enabled"), "precision and parallel.deepspeed_bf16"),
        ("bfloat16.enabled", _get(built, "bf16.enabled"), "precision and parallel.deepspeed_bf16"),
        ("torch_autocast.enabled", _get(built, "torch_autocast.enabled"), "precision and parallel.deepspeed_bf16"),
        ("fp16.enabled", False, "precision: the trainer runs bf16 or fp32"),
        ("zero_optimization.stage", _get(built, "zero_optimization.stage"), "parallel.zero_stage"),
        ("gradient_clipping", built["gradient_clipping"], "optim.grad_clip"),
    ]
    for key, want, why in controlled:
        have = _get(user, key)
        if have is not _MISSING and not _same(have, want):
            raise ValueError(f"parallel.deepspeed_config {source}: {key} is {json.dumps(have)} in the file but the "
                             f"trainer sets {json.dumps(want)} ({why}); remove it from the file or change the "
                             "training config")
    for key, why in (("optimizer", "optim.*"), ("scheduler", "optim.warmup_steps / optim.schedule")):
        if key in user:
            raise ValueError(f"parallel.deepspeed_config {source}: the file has a '{key}' section but the trainer "
                             f"builds the {key} itself (from {why}); remove it from the file")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`: nested dicts merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merged_config(built: dict[str, Any], user: dict[str, Any] | None, *, dp_size: int, source: str = "the file"
                  ) -> dict[str, Any]:
    """The config an engine runs with: `built` with `user` merged over it (after `check_user_config`)."""
    if not user:
        return built
    check_user_config(built, user, dp_size=dp_size, source=source)
    return deep_merge(built, user)


def changed_keys(built: dict[str, Any], merged: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose value the merge added or changed (for the log)."""
    out = []
    for k, v in merged.items():
        b = built.get(k, _MISSING)
        if isinstance(v, dict) and isinstance(b, dict):
            out += changed_keys(b, v, f"{prefix}{k}.")
        elif b is _MISSING or not _same(b, v):
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def built_for(cfg) -> dict[str, Any]:
    """The config the trainer builds for a TrainConfig, before a user file is merged over it."""
    p = cfg.parallel
    return trainer_ds_config(micro_batch=cfg.micro_batch, grad_clip=cfg.optim.grad_clip, precision=cfg.precision,
                             zero_stage=p.zero_stage, persistence_threshold=p.zero_persistence_threshold,
                             bf16_mode=p.deepspeed_bf16)


def training_ds_config(cfg, dp_size: int) -> dict[str, Any]:
    """The merged config the trainer's DeepSpeed engines get for a TrainConfig (what --dry-run prints);
    `dp_size` is DeepSpeed's data-parallel size (data parallel x sequence parallel)."""
    built = built_for(cfg)
    if not cfg.parallel.deepspeed_config:
        return built
    path = cfg.parallel.deepspeed_config
    return merged_config(built, load_user_config(path), dp_size=dp_size, source=path)
