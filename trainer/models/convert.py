"""Weights between our modules and diffusers (both ways), and Stable Diffusion single-file checkpoints.

Our modules use the CompVis/Stability key layout, so a single-file checkpoint needs only its prefixes stripped
(``model.diffusion_model.`` -> UNet, ``first_stage_model.`` -> autoencoder). The diffusers layout differs by
block names, computed here from the model config as an explicit prefix map; the VAE's attention also changes
from 1x1 convolutions (ours) to linear layers (diffusers).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .autoencoder import AutoencoderConfig
from .unet import UNetConfig

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _unet_prefixes(cfg: UNetConfig) -> dict[str, str]:
    """Our block prefix -> diffusers block prefix."""
    m = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
        "label_emb": "class_embedding",
        "middle_block.0": "mid_block.resnets.0",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1",
    }
    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    idx = 1
    for level in range(levels):
        attn = 2**level in cfg.attention_resolutions
        for j in range(nrb):
            m[f"input_blocks.{idx}.0"] = f"down_blocks.{level}.resnets.{j}"
            if attn:
                m[f"input_blocks.{idx}.1"] = f"down_blocks.{level}.attentions.{j}"
            idx += 1
        if level != levels - 1:
            m[f"input_blocks.{idx}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            idx += 1
    idx = 0
    for up, level in enumerate(reversed(range(levels))):
        attn = 2**level in cfg.attention_resolutions
        for j in range(nrb + 1):
            m[f"output_blocks.{idx}.0"] = f"up_blocks.{up}.resnets.{j}"
            if attn:
                m[f"output_blocks.{idx}.1"] = f"up_blocks.{up}.attentions.{j}"
            if level and j == nrb:
                m[f"output_blocks.{idx}.{2 if attn else 1}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            idx += 1
    return m


def _vae_prefixes(cfg: AutoencoderConfig) -> dict[str, str]:
    if cfg.attn_resolutions:
        raise ValueError(
            "diffusers' AutoencoderKL has no per-level attention: autoencoder.attn_resolutions must be []"
        )
    levels = len(cfg.ch_mult)
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = f"{part}.conv_in"
        m[f"{part}.conv_out"] = f"{part}.conv_out"
        m[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        m[f"{part}.mid.block_1"] = f"{part}.mid_block.resnets.0"
        m[f"{part}.mid.attn_1"] = f"{part}.mid_block.attentions.0"
        m[f"{part}.mid.block_2"] = f"{part}.mid_block.resnets.1"
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            m[f"encoder.down.{level}.block.{j}"] = f"encoder.down_blocks.{level}.resnets.{j}"
        if level != levels - 1:
            m[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        up = levels - 1 - level
        for j in range(cfg.num_res_blocks + 1):
            m[f"decoder.up.{level}.block.{j}"] = f"decoder.up_blocks.{up}.resnets.{j}"
        if level:
            m[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return m


def _rename(sd: dict[str, torch.Tensor], prefixes: dict[str, str], inner: dict[str, dict[str, str]]) -> dict:
    """Rename keys by their longest matching prefix; ``inner`` renames the rest by the target block's kind."""
    ordered = sorted(prefixes, key=len, reverse=True)
    out = {}
    for key, value in sd.items():
        src = next((p for p in ordered if key == p or key.startswith(p + ".")), None)
        if src is None:
            raise KeyError(f"no conversion rule for weight {key!r}")
        dst, rest = prefixes[src], key[len(src) + 1 :]
        for kind, table in inner.items():
            if kind in src or kind in dst:
                for a, b in table.items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a) :]
                        break
        out[f"{dst}.{rest}" if rest else dst] = value
    return out


def unet_to_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our (CompVis-layout) UNet state dict -> diffusers ``UNet2DConditionModel`` keys."""
    return _rename(sd, _unet_prefixes(cfg), {"resnets": _RESNET})


def unet_from_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Diffusers ``UNet2DConditionModel`` state dict -> ours."""
    inverse = {v: k for k, v in _unet_prefixes(cfg).items()}
    return _rename(sd, inverse, {"resnets": {v: k for k, v in _RESNET.items()}})


def _reshape_vae_attention(sd: dict[str, torch.Tensor], to_linear: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        is_proj = ".attentions." in k or ".attn_1." in k
        if is_proj and to_linear and v.ndim == 4:
            v = v[:, :, 0, 0]
        elif is_proj and not to_linear and v.ndim == 2:
            v = v[:, :, None, None]
        out[k] = v
    return out


def vae_to_diffusers(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """Our (CompVis-layout) KL autoencoder state dict -> diffusers ``AutoencoderKL`` keys."""
    renamed = _rename(
        sd, _vae_prefixes(cfg), {"resnets": {"nin_shortcut": "conv_shortcut"}, "attentions": _VAE_ATTN}
    )
    return _reshape_vae_attention(renamed, to_linear=True)


def vae_from_diffusers(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> ours."""
    inverse = {v: k for k, v in _vae_prefixes(cfg).items()}
    inner = {"block": {"conv_shortcut": "nin_shortcut"}, "attn_1": {v: k for k, v in _VAE_ATTN.items()}}
    return _reshape_vae_attention(_rename(sd, inverse, inner), to_linear=False)


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The ``UNet2DConditionModel`` config with the same architecture as ``cfg``."""
    levels = len(cfg.channel_mult)
    attn = [2**i in cfg.attention_resolutions for i in range(levels)]
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    return {
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": chans,
        "layers_per_block": cfg.num_res_blocks,
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": [cfg.heads_for(c)[0] for c in chans],  # diffusers' legacy name for head count
        "transformer_layers_per_block": cfg.transformer_depth,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "num_class_embeds": cfg.num_classes or None,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "downsample_padding": 1,
    }


def diffusers_vae_config(cfg: AutoencoderConfig) -> dict:
    """The ``AutoencoderKL`` config with the same architecture as ``cfg``."""
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError("diffusers' AutoencoderKL needs autoencoder.z_channels == autoencoder.embed_dim")
    known = {"scaling_factor": cfg.scale_factor} if cfg.scale_factor > 0 else {}  # else: measured from data
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(cfg.ch_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(cfg.ch_mult),
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.embed_dim,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.resolution,
        **known,
    }


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """Our UNetConfig for a diffusers ``UNet2DConditionModel`` config (SD 1.x/2.x family)."""
    chans = list(d["block_out_channels"])
    mc = chans[0]
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    heads = [heads] * len(chans) if isinstance(heads, int) else list(heads)
    dims = {c // h for c, h in zip(chans, heads, strict=True)}
    if len(set(heads)) > 1 and len(dims) > 1:
        raise ValueError(
            f"heads {heads} for channels {chans}: neither the head count nor the head size is constant"
        )
    attn = [2**i for i, t in enumerate(d["down_block_types"]) if t.startswith("CrossAttn")]
    depth = d.get("transformer_layers_per_block", 1)
    return UNetConfig(
        in_channels=d["in_channels"],
        out_channels=d["out_channels"],
        model_channels=mc,
        channel_mult=[c // mc for c in chans],
        num_res_blocks=d["layers_per_block"],
        attention_resolutions=attn,
        num_heads=heads[0] if len(set(heads)) == 1 else -1,
        head_dim=-1 if len(set(heads)) == 1 else dims.pop(),
        transformer_depth=depth if isinstance(depth, int) else depth[0],
        context_dim=d["cross_attention_dim"],
        use_linear_in_transformer=bool(d.get("use_linear_projection")),
        num_classes=d.get("num_class_embeds") or 0,
        norm_groups=d.get("norm_num_groups", 32),
        sample_size=d.get("sample_size", 64),
    )


def load_single_file(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Split a CompVis/Stability checkpoint (.safetensors, or a .ckpt read by the restricted unpickler of
    ``safe_pickle``: Lightning's pickled callbacks and hyper-parameters become inert stubs, nothing in the file
    runs) into ``{"unet": ..., "autoencoder": ..., "text_encoder": ...}`` state dicts in our key layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        from .safe_pickle import load_checkpoint

        sd = load_checkpoint(path)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict):
            raise KeyError(
                f"{path} holds {type(sd).__name__}, not a state dict: not a Stable Diffusion checkpoint"
            )
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "autoencoder": {}, "text_encoder": {}}
    prefixes = {
        "model.diffusion_model.": "unet",
        "first_stage_model.": "autoencoder",
        "cond_stage_model.": "text_encoder",
    }
    for key, value in sd.items():
        for prefix, part in prefixes.items():
            if key.startswith(prefix):
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{path}: weight {key!r} is {value!r}, not a tensor")
                parts[part][key[len(prefix) :]] = value
    if not parts["unet"]:
        raise KeyError(f"{path} has no 'model.diffusion_model.*' weights: not a Stable Diffusion checkpoint")
    return parts
