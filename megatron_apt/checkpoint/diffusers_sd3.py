"""diffusers `SD3Transformer2DModel` <-> megatron_apt MMDiT, through an explicit key table.

Every tensor of either side is named in the table below (per block, per model); a key that the table
does not cover is an error, never silently dropped, so checkpoint mismatches show up at conversion time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megatron_apt.config.model import MMDiTConfig
from megatron_apt.checkpoint.model_dir import save_mmdit
from megatron_apt.models.mmdit import MMDiT
from megatron_apt.utils import atomic_directory

# ours <- diffusers, for the model outside the blocks
MODEL_KEYS: dict[str, str] = {
    "pos_table": "pos_embed.pos_embed",
    "patch_embed.weight": "pos_embed.proj.weight",  # Conv2d (D, C, p, p) <-> Linear (D, C*p*p)
    "patch_embed.bias": "pos_embed.proj.bias",
    "t_embed.linear_1.weight": "time_text_embed.timestep_embedder.linear_1.weight",
    "t_embed.linear_1.bias": "time_text_embed.timestep_embedder.linear_1.bias",
    "t_embed.linear_2.weight": "time_text_embed.timestep_embedder.linear_2.weight",
    "t_embed.linear_2.bias": "time_text_embed.timestep_embedder.linear_2.bias",
    "pooled_embed.linear_1.weight": "time_text_embed.text_embedder.linear_1.weight",
    "pooled_embed.linear_1.bias": "time_text_embed.text_embedder.linear_1.bias",
    "pooled_embed.linear_2.weight": "time_text_embed.text_embedder.linear_2.weight",
    "pooled_embed.linear_2.bias": "time_text_embed.text_embedder.linear_2.bias",
    "text_embed.weight": "context_embedder.weight",
    "text_embed.bias": "context_embedder.bias",
    "norm_out.weight": "norm_out.linear.weight",
    "norm_out.bias": "norm_out.linear.bias",
    "proj_out.weight": "proj_out.weight",
    "proj_out.bias": "proj_out.bias",
}

# ours <- diffusers, inside block i (prefixes blocks.{i}. and transformer_blocks.{i}.)
BLOCK_KEYS: dict[str, str] = {
    "x_mod.weight": "norm1.linear.weight",
    "x_mod.bias": "norm1.linear.bias",
    "c_mod.weight": "norm1_context.linear.weight",
    "c_mod.bias": "norm1_context.linear.bias",
    "attn.x_q.weight": "attn.to_q.weight", "attn.x_q.bias": "attn.to_q.bias",
    "attn.x_k.weight": "attn.to_k.weight", "attn.x_k.bias": "attn.to_k.bias",
    "attn.x_v.weight": "attn.to_v.weight", "attn.x_v.bias": "attn.to_v.bias",
    "attn.c_q.weight": "attn.add_q_proj.weight", "attn.c_q.bias": "attn.add_q_proj.bias",
    "attn.c_k.weight": "attn.add_k_proj.weight", "attn.c_k.bias": "attn.add_k_proj.bias",
    "attn.c_v.weight": "attn.add_v_proj.weight", "attn.c_v.bias": "attn.add_v_proj.bias",
    "attn.x_out.weight": "attn.to_out.0.weight", "attn.x_out.bias": "attn.to_out.0.bias",
    "attn.c_out.weight": "attn.to_add_out.weight", "attn.c_out.bias": "attn.to_add_out.bias",
    "attn.x_norm_q.weight": "attn.norm_q.weight", "attn.x_norm_k.weight": "attn.norm_k.weight",
    "attn.c_norm_q.weight": "attn.norm_added_q.weight", "attn.c_norm_k.weight": "attn.norm_added_k.weight",
    "x_mlp.fc1.weight": "ff.net.0.proj.weight", "x_mlp.fc1.bias": "ff.net.0.proj.bias",
    "x_mlp.fc2.weight": "ff.net.2.weight", "x_mlp.fc2.bias": "ff.net.2.bias",
    "c_mlp.fc1.weight": "ff_context.net.0.proj.weight", "c_mlp.fc1.bias": "ff_context.net.0.proj.bias",
    "c_mlp.fc2.weight": "ff_context.net.2.weight", "c_mlp.fc2.bias": "ff_context.net.2.bias",
}


def key_table(cfg: MMDiTConfig) -> dict[str, str]:
    """The full ours -> diffusers key table for a model of this config (only keys the model has)."""
    with torch.device("meta"):
        ours = MMDiT(cfg).state_dict().keys()
    table: dict[str, str] = {}
    for k in ours:
        if k in MODEL_KEYS:
            table[k] = MODEL_KEYS[k]
            continue
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            if rest in BLOCK_KEYS:
                table[k] = f"transformer_blocks.{i}.{BLOCK_KEYS[rest]}"
                continue
        raise KeyError(f"model key {k} has no diffusers SD3 counterpart in the key table")
    return table


def config_from_diffusers(dcfg: dict[str, Any]) -> MMDiTConfig:
    if dcfg.get("dual_attention_layers"):
        raise ValueError("SD3 models with dual attention layers (SD3.5-medium's MMDiT-X) are not supported yet")
    qk = dcfg.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise ValueError(f"qk_norm={qk!r} is not supported (only 'rms_norm' or none)")
    heads, hd = int(dcfg["num_attention_heads"]), int(dcfg["attention_head_dim"])
    hidden = heads * hd
    if int(dcfg.get("caption_projection_dim", hidden)) != hidden:
        raise ValueError("caption_projection_dim must equal num_attention_heads * attention_head_dim")
    p = int(dcfg["patch_size"])
    return MMDiTConfig(
        in_channels=int(dcfg["in_channels"]),
        out_channels=int(dcfg.get("out_channels") or dcfg["in_channels"]),
        patch_size=(1, p, p),
        hidden_size=hidden,
        num_layers=int(dcfg["num_layers"]),
        num_heads=heads,
        mlp_ratio=4.0,
        text_dim=int(dcfg["joint_attention_dim"]),
        pooled_dim=int(dcfg["pooled_projection_dim"]),
        qk_norm=qk == "rms_norm",
        adaln="per_block",
        pos_embed="sincos2d",
        pos_embed_max_size=int(dcfg["pos_embed_max_size"]),
        pos_embed_base_size=int(dcfg["sample_size"]) // p,
        timestep_scale=1000.0,
        last_block_context_pre_only=True,
        keep_unused_text_query=True,
    )


def config_to_diffusers(cfg: MMDiTConfig) -> dict[str, Any]:
    if cfg.adaln != "per_block" or cfg.pos_embed != "sincos2d" or cfg.patch_size[0] != 1 \
            or cfg.patch_size[1] != cfg.patch_size[2] or cfg.mlp_ratio != 4.0 or not cfg.last_block_context_pre_only:
        raise ValueError("only SD3-configured models (adaln=per_block, pos_embed=sincos2d, square 2D patches, "
                         "mlp_ratio 4) can be exported to diffusers SD3Transformer2DModel")
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": cfg.pos_embed_base_size * cfg.patch_size[1],
        "patch_size": cfg.patch_size[1],
        "in_channels": cfg.in_channels,
        "num_layers": cfg.num_layers,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.text_dim,
        "caption_projection_dim": cfg.hidden_size,
        "pooled_projection_dim": cfg.pooled_dim,
        "out_channels": cfg.out_ch,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "dual_attention_layers": [],
        "qk_norm": "rms_norm" if cfg.qk_norm else None,
    }


def read_diffusers_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and all safetensors weights (single file or sharded with an index) of a diffusers dir."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"diffusers model directory {path} does not exist")
    if path.joinpath("transformer", "config.json").is_file() and not path.joinpath("config.json").is_file():
        path = path / "transformer"  # a whole pipeline directory was given
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json (expected a diffusers SD3Transformer2DModel directory)")
    dcfg = json.loads(cfg_file.read_text())
    if dcfg.get("_class_name") not in (None, "SD3Transformer2DModel"):
        raise ValueError(f"{cfg_file} describes a {dcfg.get('_class_name')}, not an SD3Transformer2DModel")
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is missing weight shards {missing} listed in {index[0].name}")
        shards = [path / f for f in files]
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path} has no .safetensors weights (.bin pickles are not read: convert them first)")
    state: dict[str, torch.Tensor] = {}
    for f in shards:
        try:
            state.update(load_file(str(f)))
        except Exception as e:
            raise ValueError(f"cannot read {f}: {e} (truncated or not a safetensors file?)") from e
    return dcfg, state


def diffusers_to_ours(state: dict[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    table = key_table(cfg)
    theirs_needed = set(table.values())
    missing = sorted(theirs_needed - set(state))
    # SD3 keeps the sin-cos table as a buffer; older exports may omit it, then ours is computed
    missing = [m for m in missing if m != "pos_embed.pos_embed"]
    unexpected = sorted(set(state) - theirs_needed)
    if missing or unexpected:
        raise ValueError(f"diffusers weights do not match the key table: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    with torch.device("meta"):
        ref = MMDiT(cfg).state_dict()
    out = {}
    for ours, theirs in table.items():
        if theirs not in state:
            continue
        t = state[theirs]
        if ours == "patch_embed.weight":
            t = t.reshape(t.shape[0], -1)
        if tuple(t.shape) != tuple(ref[ours].shape):
            raise ValueError(f"{theirs} has shape {tuple(t.shape)} but {ours} needs {tuple(ref[ours].shape)}")
        out[ours] = t
    return out


def ours_to_diffusers(state: dict[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    table = key_table(cfg)
    missing = sorted(set(table) - set(state))
    if missing:
        raise ValueError(f"model state is missing {missing[:8]}")
    out = {}
    p = cfg.patch_size[1]
    for ours, theirs in table.items():
        t = state[ours]
        if ours == "patch_embed.weight":
            t = t.reshape(t.shape[0], cfg.in_channels, p, p)
        out[theirs] = t.contiguous()
    return out


def import_diffusers(src: str | Path, dst: str | Path, overwrite: bool = False, dtype: torch.dtype | None = None):
    """Convert a diffusers SD3 transformer directory to a megatron_apt model directory."""
    dcfg, state = read_diffusers_dir(src)
    cfg = config_from_diffusers(dcfg)
    ours = diffusers_to_ours(state, cfg)
    with torch.device("meta"):
        model = MMDiT(cfg)
    if "pos_table" not in ours:
        from megatron_apt.models.mmdit import get_2d_sincos_table

        ours["pos_table"] = get_2d_sincos_table(cfg.hidden_size, cfg.pos_embed_max_size, cfg.pos_embed_base_size)[None]
    if dtype is not None:
        ours = {k: v.to(dtype) for k, v in ours.items()}
    model.load_state_dict(ours, assign=True, strict=True)
    save_mmdit(model, dst, kind="diffusion", overwrite=overwrite, extra={"source": f"diffusers:{Path(src).name}"})
    return model


def export_diffusers(model: MMDiT, dst: str | Path, overwrite: bool = False) -> Path:
    """Write an SD3-configured model as a diffusers SD3Transformer2DModel directory (atomically)."""
    dcfg = config_to_diffusers(model.config)
    state = ours_to_diffusers({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.config)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(dcfg, indent=2) + "\n")
    return Path(dst)
