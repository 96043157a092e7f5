"""A pipeline in the ecosystem's formats: a diffusers folder (``StableDiffusionPipeline.from_pretrained(dir)``
with no extra argument when the text encoder is an OpenCLIP tower: it gets a transformers ``CLIPTextModel`` and
``CLIPTokenizer``) and a CompVis-layout single ``.safetensors`` (``from_single_file(path, config=dir)``, the
configs beside it so nothing is downloaded). Files are written atomically; diffusers is not imported."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipeline.atomic import atomic_json, atomic_save, atomic_write

from ..diffusion.objectives import Diffusion
from ..models.clip_convert import exportable, hf_text_config, text_to_compvis, text_to_hf, tokenizer_files
from ..models.convert import diffusers_unet_config, diffusers_vae_config, unet_to_diffusers, vae_to_diffusers
from .pipeline import LatentDiffusionPipeline

DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "4.45.0"  # the oldest transformers the dev extra allows; newer ones read it too


def _safetensors(path: Path, weights: dict[str, torch.Tensor]) -> None:
    sd = {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}
    atomic_save(path, lambda tmp: save_file(sd, str(tmp)))


def write_component(folder: Path, class_name: str, config: dict, weights: dict | None) -> None:
    """A diffusers model folder: ``config.json`` and, unless ``weights`` is None, its safetensors."""
    if weights is not None:
        _safetensors(folder / "diffusion_pytorch_model.safetensors", weights)
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


def write_text_encoder(encoder, out: Path, weights: bool = True) -> None:
    """``text_encoder/`` (transformers CLIPTextModel) and ``tokenizer/`` (CLIPTokenizer)."""
    config = {**hf_text_config(encoder), "transformers_version": TRANSFORMERS_VERSION}
    if weights:
        _safetensors(out / "text_encoder" / "model.safetensors", text_to_hf(encoder))
    atomic_json(out / "text_encoder" / "config.json", config)
    for name, text in tokenizer_files(encoder).items():
        atomic_write(out / "tokenizer" / name, text)


def write_diffusers(pipe: LatentDiffusionPipeline, out: Path, weights: bool = True) -> Path:
    """unet/, vae/, scheduler/, model_index.json and, for an OpenCLIP text tower, text_encoder/ + tokenizer/
    (other encoders have no transformers equivalent: pass their embeddings as ``prompt_embeds``). Without
    ``weights`` only the configs and the tokenizer (what ``from_single_file`` needs beside the file)."""
    ucfg, vcfg = pipe.unet.config, pipe.autoencoder.config
    unet_sd = unet_to_diffusers({k: v.float() for k, v in pipe.unet.state_dict().items()}, ucfg)
    vae_sd = vae_to_diffusers({k: v.float() for k, v in pipe.autoencoder.state_dict().items()}, vcfg)
    write_component(
        out / "unet", "UNet2DConditionModel", diffusers_unet_config(ucfg), unet_sd if weights else None
    )
    vae_config = {**diffusers_vae_config(vcfg), "scaling_factor": pipe.scale_factor}
    write_component(out / "vae", "AutoencoderKL", vae_config, vae_sd if weights else None)
    atomic_json(out / "scheduler" / "scheduler_config.json", scheduler_config(pipe.diffusion))
    text = exportable(pipe.text_encoder)
    if text:
        write_text_encoder(pipe.text_encoder, out, weights)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"] if text else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"] if text else [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    atomic_json(out / "model_index.json", index)
    return out


def single_file_weights(pipe: LatentDiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every weight under a CompVis/Stability checkpoint's keys (our modules use that layout already)."""
    sd = {f"model.diffusion_model.{k}": v for k, v in pipe.unet.state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in pipe.autoencoder.state_dict().items()}
    if exportable(pipe.text_encoder):
        sd |= text_to_compvis(pipe.text_encoder)
    return sd


def write_single_file(pipe: LatentDiffusionPipeline, out: Path) -> Path:
    """``model.safetensors`` (CompVis keys) and ``config/`` (the diffusers configs and tokenizer, no weights):
    ``StableDiffusionPipeline.from_single_file(out / "model.safetensors", config=str(out / "config"))``."""
    _safetensors(out / "model.safetensors", single_file_weights(pipe))
    write_diffusers(pipe, out / "config", weights=False)
    return out / "model.safetensors"
