"""Initial weights of the models from files users have: our exports, Stable Diffusion single files (CompVis
layout), diffusers folders, bare safetensors state dicts; and a fingerprint of a module's weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from data_pipeline.errors import InputError

from .convert import load_single_file, unet_config_from_diffusers, unet_from_diffusers, vae_from_diffusers


class WeightsError(InputError):
    """A weights file that does not fit the model; the message names the file."""


def load_autoencoder_weights(model: torch.nn.Module, path: str | Path) -> float | None:
    """Load our export (autoencoder.safetensors + autoencoder.json), an SD single file, a diffusers folder or a
    bare safetensors state dict. Returns the scale factor recorded with the weights, if any."""
    p = Path(path)
    scale = None
    if p.is_dir() and (p / "autoencoder.safetensors").is_file():
        for meta, key in (("autoencoder.json", "scale_factor"), ("pipeline.json", "scale_factor")):
            if (p / meta).is_file():
                scale = json.loads((p / meta).read_text()).get(key, scale)
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
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        hint = _config_difference(p / "autoencoder.json", model.config)  # our export only: else no file
        raise WeightsError(f"{p}: does not fit the autoencoder config{hint}: {str(exc)[:500]}") from None
    return scale


def _config_difference(meta_file: Path, config: object) -> str:
    """The fields where the config an export recorded differs from the one given (empty if unknown)."""
    if not meta_file.is_file() or not dataclasses.is_dataclass(config):
        return ""
    recorded = json.loads(meta_file.read_text()).get("config") or {}
    given = json.loads(json.dumps(dataclasses.asdict(config), default=str))  # tuples read back as lists
    diffs = [
        f"{k}={recorded[k]!r} there, {given[k]!r} here"
        for k in given
        if k in recorded and recorded[k] != given[k]
    ]
    return f" (its autoencoder.json differs in {'; '.join(diffs)})" if diffs else ""


def _is_single_file(path: Path) -> bool:
    """A Stable Diffusion checkpoint (keys under first_stage_model.), judged from the header only."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any(k.startswith("first_stage_model.") for k in f)


def load_unet_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Initial UNet weights: our export, an SD single file, or a diffusers folder (``unet/``)."""
    p = Path(path)
    if p.is_dir() and (p / "unet.safetensors").is_file():
        sd = load_file(str(p / "unet.safetensors"))
    elif p.is_dir():
        folder = p / "unet" if (p / "unet").is_dir() else p
        dcfg = json.loads((folder / "config.json").read_text())
        if unet_config_from_diffusers(dcfg).channel_mult != model.config.channel_mult:
            raise WeightsError(f"weights.unet: {folder} has another architecture than the unet config")
        sd = unet_from_diffusers(load_file(str(folder / "diffusion_pytorch_model.safetensors")), model.config)
    else:
        sd = load_single_file(p)["unet"]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{p}: does not fit the unet config: {str(exc)[:500]}") from None


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (names, shapes, dtypes and bytes): which autoencoder made a latent."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
