"""Exports of training checkpoints (``ldm-export``): a UNet-stage checkpoint as our native pipeline format and
a diffusers folder, an autoencoder-stage checkpoint as the files ``weights.autoencoder`` takes. ZeRO shards are
consolidated with DeepSpeed's zero_to_fp32; the EMA weights are used when the checkpoint has them."""

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
from ..models.convert import diffusers_unet_config, diffusers_vae_config, unet_to_diffusers, vae_to_diffusers
from ..models.text_encoders import ConditionEncoder
from ..models.unet import UNetModel
from ..tasks.base import Task
from .pipeline import LatentDiffusionPipeline

DIFFUSERS_VERSION = "0.42.1"


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


def _write_diffusers_component(folder: Path, class_name: str, config: dict, weights: dict) -> None:
    sd = {k: v.contiguous() for k, v in weights.items()}
    atomic_save(folder / "diffusion_pytorch_model.safetensors", lambda tmp: save_file(sd, str(tmp)))
    atomic_json(
        folder / "config.json", {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    )


def scheduler_config(diffusion: Diffusion) -> dict:
    """A DDIMScheduler config with our noise schedule and ``ldm-sample``'s DDIM settings (Stable Diffusion's:
    steps offset 1, final alpha = alpha_bar[0]), so the export samples exactly as ``ldm-sample`` does."""
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        **diffusion.schedule.diffusers_config(),
        "prediction_type": diffusion.parameterization.diffusers_name,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


def write_diffusers(pipe: LatentDiffusionPipeline, out: Path) -> Path:
    """unet/, vae/, scheduler/ and model_index.json (no text encoder: pass your own prompt embeddings)."""
    ucfg, vcfg = pipe.unet.config, pipe.autoencoder.config
    unet_sd = {k: v.float().cpu() for k, v in pipe.unet.state_dict().items()}
    vae_sd = {k: v.float().cpu() for k, v in pipe.autoencoder.state_dict().items()}
    _write_diffusers_component(
        out / "unet", "UNet2DConditionModel", diffusers_unet_config(ucfg), unet_to_diffusers(unet_sd, ucfg)
    )
    _write_diffusers_component(
        out / "vae",
        "AutoencoderKL",
        {**diffusers_vae_config(vcfg), "scaling_factor": pipe.scale_factor},
        vae_to_diffusers(vae_sd, vcfg),
    )
    atomic_json(out / "scheduler" / "scheduler_config.json", scheduler_config(pipe.diffusion))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    atomic_json(out / "model_index.json", index)
    return out


def export_autoencoder(folder: Path, out: Path, ema: bool = True) -> Path:
    """An autoencoder-stage checkpoint as ``autoencoder.safetensors`` + ``autoencoder.json`` (what
    ``weights.autoencoder`` takes) and, for KL models without attention, ``diffusers/vae``."""
    _, cfg = checkpoint_task(folder)
    model = build(cfg.autoencoder, "autoencoder", Autoencoder)
    model.load_state_dict(_part(trained_weights(folder, ema), "autoencoder"), strict=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_save(out / "autoencoder.safetensors", lambda tmp: save_file(sd, str(tmp)))
    meta = {
        "config": config_dict(model.config),
        "scale_factor": model.config.scale_factor,
        "checkpoint": str(folder),
        "weights": "ema" if uses_ema(folder, ema) else "raw",
    }
    atomic_json(out / "autoencoder.json", meta)
    if not model.config.attn_resolutions and isinstance(model, AutoencoderKL):
        sd = {k: v.float() for k, v in model.state_dict().items()}
        _write_diffusers_component(
            out / "diffusers" / "vae",
            "AutoencoderKL",
            diffusers_vae_config(model.config),
            vae_to_diffusers(sd, model.config),
        )
    return out


def export_pipeline(folder: Path, out: Path, ema: bool = True, diffusers: bool = True) -> Path:
    """A UNet-stage checkpoint as our native format (``pipeline.json`` + safetensors) and ``diffusers/``."""
    pipe = pipeline_from_checkpoint(folder, "cpu", ema)
    pipe.save(out)
    if diffusers:
        write_diffusers(pipe, out / "diffusers")
    return out


def export(path: str | Path, out: str | Path, ema: bool = True, diffusers: bool = True) -> Path:
    """Export the checkpoint at ``path`` (a checkpoints folder: its latest) the way its stage exports."""
    folder = checkpoint_folder(path)
    task, _ = checkpoint_task(folder)
    return task.export(folder, Path(out), ema=ema, diffusers=diffusers)
