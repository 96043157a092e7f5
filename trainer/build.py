"""Build the models of a training config, load their initial weights, and check the config before anything
expensive starts: every error names the config key at fault."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from data_pipeline.urls import expand_shards

from .config import build, to_dataclass
from .models.convert import (
    load_single_file,
    unet_config_from_diffusers,
    unet_from_diffusers,
    vae_from_diffusers,
)

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A training config that cannot work; the message names the key."""


def validate(cfg, check_data: bool = True, check_files: bool = True) -> None:
    """Checks that need no model weights and no process group. ``check_data``: the shards exist now;
    ``check_files``: the weight files exist now (both off for a dry run meant for another machine)."""
    from omegaconf import OmegaConf

    from .train_config import TrainConfig

    try:  # again, strictly: Hydra's `+key=value` may have added keys the schema does not know
        OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(cfg, resolve=False))
    except Exception as exc:
        raise ConfigError(f"config does not match the schema: {exc}") from None
    if cfg.stage not in ("unet", "autoencoder"):
        raise ConfigError(f"stage must be 'unet' or 'autoencoder', got {cfg.stage!r}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0-3, got {cfg.deepspeed.zero_stage}")
    if cfg.data.kind not in ("images", "latents") or (cfg.data.kind == "latents" and cfg.stage != "unet"):
        raise ConfigError(f"data.kind={cfg.data.kind!r}: images for both stages, latents for stage=unet")
    if cfg.posterior not in ("sample", "mean"):
        raise ConfigError(f"posterior must be 'sample' or 'mean', got {cfg.posterior!r}")
    try:
        if check_data:
            expand_shards(cfg.data.urls, cfg.data.allow_pipe)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.urls: {exc}") from None
    ae = to_dataclass(cfg.autoencoder, "autoencoder")
    if cfg.stage == "autoencoder":
        if cfg.data.resolution % ae.downsampling:
            raise ConfigError(
                f"data.resolution={cfg.data.resolution} is not divisible by the autoencoder's "
                f"downsampling f={ae.downsampling}"
            )
        return
    unet = to_dataclass(cfg.unet, "unet")
    total = ae.downsampling * unet.downsampling
    if cfg.data.resolution % total:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} is not divisible by the autoencoder's f="
            f"{ae.downsampling} times the UNet's downsampling {unet.downsampling} (= {total})"
        )
    extra = {"none": 0, "inpaint": ae.embed_dim + 1, "superres": 3}.get(cfg.concat)
    if extra is None:
        raise ConfigError(f"concat must be none | inpaint | superres, got {cfg.concat!r}")
    if unet.in_channels != ae.embed_dim + extra:
        raise ConfigError(
            f"unet.in_channels={unet.in_channels} but the autoencoder's latents have {ae.embed_dim} "
            f"channels (+{extra} for concat={cfg.concat})"
        )
    if cfg.text_encoder is None:
        raise ConfigError("text_encoder: the UNet stage needs a condition encoder (text_encoder=...)")
    text = to_dataclass(cfg.text_encoder, "text_encoder")
    trainable = bool(getattr(text, "trainable", False))
    modules = list(cfg.deepspeed.modules)
    if "unet" not in modules:
        raise ConfigError(f"deepspeed.modules={modules} must include 'unet'")
    unknown = set(modules) - {"unet", "text_encoder", "autoencoder"}
    if unknown:
        raise ConfigError(f"deepspeed.modules: unknown module(s) {sorted(unknown)}")
    frozen = [m for m in modules if m == "autoencoder" or (m == "text_encoder" and not trainable)]
    if frozen:
        why = "ZeRO-3 would shard" if cfg.deepspeed.zero_stage == 3 else "the engine would wrap"
        raise ConfigError(
            f"deepspeed.modules lists frozen {frozen}: {why} a frozen encoder; frozen encoders stay "
            "outside DeepSpeed (never sharded, never in the optimizer)"
        )
    if not check_files:
        return
    if not cfg.weights.autoencoder and not cfg.weights.allow_random_autoencoder:
        raise ConfigError(
            "weights.autoencoder is empty: the UNet stage needs trained autoencoder weights "
            "(our export, an SD checkpoint or a diffusers folder)"
        )
    for key in ("autoencoder", "unet"):
        path = getattr(cfg.weights, key)
        if path and not Path(path).exists():
            raise ConfigError(f"weights.{key}: {path!r} does not exist")


def load_autoencoder_weights(model: torch.nn.Module, path: str) -> float | None:
    """Load our export (autoencoder.safetensors + autoencoder.json), an SD single file, a diffusers folder or a
    bare safetensors state dict. Returns the scale factor recorded with the weights, if any."""
    p = Path(path)
    scale = None
    if p.is_dir() and (p / "autoencoder.safetensors").is_file():
        meta = p / "autoencoder.json"
        if meta.is_file():
            scale = json.loads(meta.read_text()).get("scale_factor")
        if (p / "pipeline.json").is_file():
            scale = json.loads((p / "pipeline.json").read_text()).get("scale_factor")
        sd = load_file(str(p / "autoencoder.safetensors"))
    elif p.is_dir():
        folder = p / "vae" if (p / "vae").is_dir() else p
        sd = vae_from_diffusers(load_file(str(folder / "diffusion_pytorch_model.safetensors")), model.config)
        cfg_file = folder / "config.json"
        if cfg_file.is_file():
            scale = json.loads(cfg_file.read_text()).get("scaling_factor")
    elif p.suffix in (".ckpt", ".pt") or _is_single_file(p):
        sd = load_single_file(p)["autoencoder"]
    else:
        sd = load_file(str(p))
    model.load_state_dict(sd, strict=True)
    return scale


def _is_single_file(path: Path) -> bool:
    """A Stable Diffusion checkpoint (keys under first_stage_model.), judged from the header only."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any(k.startswith("first_stage_model.") for k in f)


def load_unet_weights(model: torch.nn.Module, path: str) -> None:
    """Initial UNet weights: our export, an SD single file, or a diffusers folder (``unet/``)."""
    p = Path(path)
    if p.is_dir() and (p / "unet.safetensors").is_file():
        sd = load_file(str(p / "unet.safetensors"))
    elif p.is_dir():
        folder = p / "unet" if (p / "unet").is_dir() else p
        dcfg = json.loads((folder / "config.json").read_text())
        if unet_config_from_diffusers(dcfg).channel_mult != model.config.channel_mult:
            raise ConfigError(f"weights.unet: {folder} has another architecture than the unet config")
        sd = unet_from_diffusers(load_file(str(folder / "diffusion_pytorch_model.safetensors")), model.config)
    else:
        sd = load_single_file(p)["unet"]
    model.load_state_dict(sd, strict=True)


def build_models(cfg) -> tuple[dict, float]:
    """The stage's models with their initial weights, and the latent scale factor."""
    autoencoder = build(cfg.autoencoder, "autoencoder")
    scale = autoencoder.config.scale_factor
    models = {"autoencoder": autoencoder}
    if cfg.stage == "autoencoder":
        return models, scale
    if cfg.weights.autoencoder:
        recorded = load_autoencoder_weights(autoencoder, cfg.weights.autoencoder)
        scale = recorded or scale
    else:
        log.warning("weights.allow_random_autoencoder: training on a randomly initialised autoencoder")
    models["text_encoder"] = build(cfg.text_encoder, "text_encoder")
    models["unet"] = build(cfg.unet, "unet")
    if models["unet"].config.context_dim != models["text_encoder"].context_dim:
        raise ConfigError(
            f"unet.context_dim={models['unet'].config.context_dim} but the text encoder gives "
            f"{models['text_encoder'].context_dim}-dim tokens"
        )
    if cfg.weights.unet:
        load_unet_weights(models["unet"], cfg.weights.unet)
    return models, float(scale)


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (names, shapes, dtypes and bytes): which autoencoder made a latent."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
