"""`reshard`: a model directory <-> N tensor-parallel shard files (`load_tp_shard` reads one back)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_apt.config.model import MMDiTConfig
from megatron_apt.checkpoint.model_dir import CONFIG_NAME
from megatron_apt.utils import atomic_directory, get_logger, progress
from megatron_apt.checkpoint.common import ConversionError, Echo, MAX_FORWARD_PARAMS, SHARD_NAME, VerificationError, quiet, check_output, check_preset, count_parameters
from megatron_apt.checkpoint.model_dir import instantiate, meta_model_args, write_json, load_tp_shard, read_model_state, write_model_files
from megatron_apt.checkpoint.tensor_parallel import check_divisible, split_tp_shard, tp_partition_dims
from megatron_apt.checkpoint.verify import Report, written, forward_error, probe_forward

log = get_logger("megatron_apt.checkpoint")

# ---- reshard -------------------------------------------------------------------------------------------
_TP_KEYS = ("tp", "partition_dims", "shards")


def reshard(src: str | Path, output: str | Path, tp: int, overwrite: bool = False, expect_preset: str | None = None,
            verify: bool = False, echo: Echo = quiet) -> Report:
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
    check_divisible(state, dims, tp)
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
            write_json(tmp / CONFIG_NAME, {**base, "tp": tp, "shards": names, "partition_dims": dims})
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
            n = count_parameters(state, *meta_model_args(meta, {k: v.shape for k, v in state.items()}))
            if n <= MAX_FORWARD_PARAMS:
                kind = meta.get("kind")
                out = probe_forward(instantiate(meta, back), kind)
                err = forward_error(out, probe_forward(instantiate(meta, state), kind))
                msg += f"; CPU forward of the reassembled model: max |out - source's| = {err:.2e}"
            echo(msg)
    split = sum(1 for d in dims.values() if d >= 0)
    report.outputs.append(written(Path(output), state, meta, f"tp {tp}"))
    report.changes.append(f"{split} of {len(dims)} tensors split along their partition dim ({have} -> {tp} shards); "
                          f"{len(dims) - split} replicated; values unchanged")
    return report
