"""Exports of training checkpoints (``ldm-export``): a UNet-stage checkpoint (or a native export) in the formats
asked for: our native pipeline format, a diffusers folder, a CompVis single file (formats.py); an
autoencoder-stage checkpoint as the files ``weights.autoencoder`` takes. ZeRO shards are consolidated with
DeepSpeed's zero_to_fp32; the EMA weights are used when the checkpoint has them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from data_pipeline.atomic import atomic_json, atomic_save

from ..config import ConfigError, build, config_dict, offline
from ..diffusion.objectives import Diffusion
from ..engine.checkpoint import COMMITTED, newest
from ..engine.ema import saved_ema, stitch
from ..engine.safe_load import weights_only_loads
from ..models.autoencoder import Autoencoder, AutoencoderKL
from ..models.convert import diffusers_vae_config, vae_to_diffusers
from ..models.text_encoders import ConditionEncoder
from ..models.unet import UNetModel
from ..tasks.base import Task
from .formats import write_component, write_diffusers, write_single_file
from .pipeline import LatentDiffusionPipeline

FORMATS = ("native", "diffusers", "single_file")  # ldm-export --format
DEFAULT_FORMATS = frozenset({"native", "diffusers"})


def checkpoint_folder(path: str | Path) -> Path:
    """A committed checkpoint folder, or a checkpoints folder's newest committed checkpoint."""
    path = Path(path)
    if (path / COMMITTED).is_file():
        return path
    found = newest(path)
    if found is None:
        raise FileNotFoundError(f"{path} holds no committed checkpoint")
    return found


def uses_ema(folder: Path, ema: bool = True) -> bool:
    """Whether ``trained_weights(folder, ema)`` reads the EMA (asked for, and the checkpoint has one)."""
    return ema and saved_ema(folder)


def trained_weights(folder: Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The engine's module weights in fp32: the EMA when present (and asked for), else consolidated shards.
    Checkpoint files load with ``weights_only=True`` (a planted pickle is refused, never run)."""
    if uses_ema(folder, ema):
        return stitch(folder)
    with weights_only_loads(folder):
        if list((folder / "model").glob("*zero_pp_rank_*_optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="model")
        else:  # ZeRO-0 in fp32: the module states hold the full weights
            sd = torch.load(
                folder / "model" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
            )
            sd = sd["module"]
    return {k: v.float() for k, v in sd.items()}


def _part(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".")}


def _frozen(ckpt_dir: Path, name: str, node, protocol) -> torch.nn.Module:
    module = build(offline(node), name, protocol)
    module.load_state_dict(load_file(str(ckpt_dir / "frozen" / f"{name}.safetensors")), strict=True)
    return module


def checkpoint_task(folder: Path) -> tuple[Task, OmegaConf]:
    """The task (stage) a checkpoint was trained by, and its resolved config."""
    cfg = OmegaConf.load(folder / "config.yaml")
    return build(cfg.task, f"{folder / 'config.yaml'}:task", Task), cfg


def pipeline_from_checkpoint(
    path: str | Path, device: str = "cpu", ema: bool = True
) -> LatentDiffusionPipeline:
    """A UNet-stage checkpoint as a pipeline (weights: EMA by default)."""
    from ..tasks.unet import UNetTask

    folder = checkpoint_folder(path)
    task, cfg = checkpoint_task(folder)
    if not isinstance(task, UNetTask):
        raise ConfigError(f"{folder} is not a UNet-stage checkpoint: export it and use weights.autoencoder")
    weights = trained_weights(folder, ema)
    ckpt_dir = folder.parent
    unet = build(cfg.unet, "unet", UNetModel)
    unet.load_state_dict(_part(weights, "unet"), strict=True)
    text = _part(weights, "text_encoder")
    if text:
        text_encoder = build(offline(cfg.text_encoder), "text_encoder", ConditionEncoder)
        text_encoder.load_state_dict(text, strict=True)
    else:
        text_encoder = _frozen(ckpt_dir, "text_encoder", cfg.text_encoder, ConditionEncoder)
    autoencoder = _frozen(ckpt_dir, "autoencoder", cfg.autoencoder, Autoencoder)
    scale = json.loads((ckpt_dir / "frozen" / "frozen.json").read_text())["scale_factor"]
    diffusion = Diffusion.from_node(cfg.diffusion)
    pipe = LatentDiffusionPipeline(
        unet.eval(), autoencoder.eval(), text_encoder.eval(), diffusion, scale, task.concat
    )
    return pipe.to(device)


def check_formats(formats: frozenset[str], allowed: tuple[str, ...] = FORMATS) -> None:
    unknown = set(formats) - set(allowed)
    if unknown or not formats:
        raise ValueError(f"--format {sorted(unknown) or '(none)'}: this export writes {', '.join(allowed)}")


def export_autoencoder(
    folder: Path, out: Path, ema: bool = True, formats: frozenset[str] = DEFAULT_FORMATS
) -> Path:
    """An autoencoder-stage checkpoint as ``autoencoder.safetensors`` + ``autoencoder.json`` (what
    ``weights.autoencoder`` takes) and, for KL models without attention, ``diffusers/vae``."""
    check_formats(formats, ("native", "diffusers"))
    _, cfg = checkpoint_task(folder)
    model = build(cfg.autoencoder, "autoencoder", Autoencoder)
    model.load_state_dict(_part(trained_weights(folder, ema), "autoencoder"), strict=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_save(out / "autoencoder.safetensors", lambda tmp: save_file(sd, str(tmp)))
    meta = {
        "config": config_dict(model.config),
        "scale_factor": model.config.scale_factor or None,  # None: the UNet stage measures it from its data
        "checkpoint": str(folder),
        "weights": "ema" if uses_ema(folder, ema) else "raw",
    }
    atomic_json(out / "autoencoder.json", meta)
    if "diffusers" in formats and not model.config.attn_resolutions and isinstance(model, AutoencoderKL):
        sd = {k: v.float() for k, v in model.state_dict().items()}
        write_component(
            out / "diffusers" / "vae",
            "AutoencoderKL",
            diffusers_vae_config(model.config),
            vae_to_diffusers(sd, model.config),
        )
    return out


def write_formats(pipe: LatentDiffusionPipeline, out: Path, formats: frozenset[str]) -> Path:
    """``out/`` (native), ``out/diffusers/``, ``out/single_file/`` as asked."""
    check_formats(formats)
    if "native" in formats:
        pipe.save(out)
    if "diffusers" in formats:
        write_diffusers(pipe, out / "diffusers")
    if "single_file" in formats:
        write_single_file(pipe, out / "single_file")
    return out


def export_pipeline(
    folder: Path, out: Path, ema: bool = True, formats: frozenset[str] = DEFAULT_FORMATS
) -> Path:
    """A UNet-stage checkpoint in ``formats`` (native: ``pipeline.json`` + safetensors; ``diffusers/``;
    ``single_file/``)."""
    check_formats(formats)
    return write_formats(pipeline_from_checkpoint(folder, "cpu", ema), out, formats)


def export(
    path: str | Path, out: str | Path, ema: bool = True, formats: frozenset[str] = DEFAULT_FORMATS
) -> Path:
    """Export the checkpoint at ``path`` (a checkpoints folder: its latest) the way its stage exports, or
    convert a native export (``pipeline.json``) to other formats."""
    path, out = Path(path), Path(out)
    if (path / "pipeline.json").is_file():
        pipe = LatentDiffusionPipeline.load(path)
        return write_formats(
            pipe, out, frozenset(formats) - ({"native"} if out.resolve() == path.resolve() else set())
        )
    folder = checkpoint_folder(path)
    task, _ = checkpoint_task(folder)
    return task.export(folder, out, ema=ema, formats=frozenset(formats))
