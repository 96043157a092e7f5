"""``ldm-export``: a training checkpoint -> our native format and a diffusers-format folder.

    ldm-export runs/demo_unet/checkpoints --out runs/demo_unet/export          # EMA weights, latest checkpoint
    ldm-export runs/x/checkpoints/step_00005000 --out export --raw             # the raw (non-EMA) weights

ZeRO shards are consolidated with DeepSpeed's zero_to_fp32. The UNet stage writes ``pipeline.json`` +
safetensors (what ``ldm-sample`` reads) and ``diffusers/`` (unet, vae, scheduler, model_index.json) for
``StableDiffusionPipeline.from_pretrained(..., text_encoder=None, tokenizer=None)``. The autoencoder stage
writes ``autoencoder.safetensors`` + ``autoencoder.json`` (what ``weights.autoencoder`` takes) and
``diffusers/vae``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from .config import build, build_offline
from .diffusion.objectives import DiffusionConfig
from .diffusion.schedules import ScheduleConfig
from .engine.checkpoint import COMMITTED, latest_tag
from .models.convert import diffusers_unet_config, diffusers_vae_config, unet_to_diffusers, vae_to_diffusers
from .pipeline import LatentDiffusionPipeline

DIFFUSERS_VERSION = "0.42.1"
PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def checkpoint_folder(path: str | Path) -> Path:
    path = Path(path)
    if (path / COMMITTED).is_file():
        return path
    tag = latest_tag(path)
    if tag is None:
        raise FileNotFoundError(f"{path} holds no committed checkpoint (no 'latest' pointing at one)")
    return path / tag


def uses_ema(folder: Path, ema: bool = True) -> bool:
    """Whether ``trained_weights(folder, ema)`` reads the EMA (asked for, and the checkpoint has one)."""
    return ema and (folder / "ema.safetensors").is_file()


def trained_weights(folder: Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The engine's module weights in fp32: the EMA when present (and asked for), else consolidated shards."""
    if uses_ema(folder, ema):
        return load_file(str(folder / "ema.safetensors"))
    if list((folder / "model").glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="model")
    else:  # ZeRO-0 in fp32: the module states hold the full weights
        sd = torch.load(
            folder / "model" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )["module"]
    return {k: v.float() for k, v in sd.items()}


def _part(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".")}


def _frozen(ckpt_dir: Path, name: str, cfg) -> torch.nn.Module:
    module = build_offline(getattr(cfg, name), name)
    module.load_state_dict(load_file(str(ckpt_dir / "frozen" / f"{name}.safetensors")), strict=True)
    return module


def pipeline_from_checkpoint(
    path: str | Path, device: str = "cpu", ema: bool = True
) -> LatentDiffusionPipeline:
    """The UNet stage's checkpoint as a pipeline (weights: EMA by default)."""
    folder = checkpoint_folder(path)
    cfg = OmegaConf.load(folder / "config.yaml")
    if cfg.stage != "unet":
        raise ValueError(
            f"{folder} is an autoencoder-stage checkpoint: export it and use weights.autoencoder"
        )
    weights = trained_weights(folder, ema)
    ckpt_dir = folder.parent
    unet = build(cfg.unet, "unet")
    unet.load_state_dict(_part(weights, "unet"), strict=True)
    text = _part(weights, "text_encoder")
    if text:
        text_encoder = build_offline(cfg.text_encoder, "text_encoder")
        text_encoder.load_state_dict(text, strict=True)
    else:
        text_encoder = _frozen(ckpt_dir, "text_encoder", cfg)
    autoencoder = _frozen(ckpt_dir, "autoencoder", cfg)
    scale = json.loads((ckpt_dir / "frozen" / "frozen.json").read_text())["scale_factor"]
    d = OmegaConf.to_container(cfg.diffusion, resolve=True)
    diffusion = DiffusionConfig(**{**d, "schedule": ScheduleConfig(**d["schedule"])})
    pipe = LatentDiffusionPipeline(
        unet.eval(), autoencoder.eval(), text_encoder.eval(), diffusion, scale, cfg.concat
    )
    return pipe.to(device)


def _write_diffusers_component(folder: Path, class_name: str, config: dict, weights: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}, indent=2)
    )
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(folder / "diffusion_pytorch_model.safetensors")
    )


def scheduler_config(diffusion: DiffusionConfig) -> dict:
    """A DDIMScheduler config with our noise schedule and ``ldm-sample``'s DDIM settings (Stable Diffusion's:
    steps offset 1, final alpha = alpha_bar[0]), so the export samples exactly as ``ldm-sample`` does."""
    s = diffusion.schedule
    kinds = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": s.num_timesteps,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "beta_schedule": kinds[s.kind],
        "prediction_type": PREDICTION[diffusion.prediction],
        "rescale_betas_zero_snr": s.zero_terminal_snr,
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
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config(pipe.diffusion), indent=2)
    )
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
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def export_autoencoder(folder: Path, out: Path, ema: bool) -> Path:
    cfg = OmegaConf.load(folder / "config.yaml")
    model = build(cfg.autoencoder, "autoencoder")
    model.load_state_dict(_part(trained_weights(folder, ema), "autoencoder"), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "autoencoder.safetensors")
    )
    meta = {
        "config": OmegaConf.to_container(cfg.autoencoder, resolve=True),
        "scale_factor": model.config.scale_factor,
        "checkpoint": str(folder),
        "weights": "ema" if uses_ema(folder, ema) else "raw",
    }
    (out / "autoencoder.json").write_text(json.dumps(meta, indent=1))
    if not model.config.attn_resolutions and model.__class__.__name__ == "AutoencoderKL":
        sd = {k: v.float() for k, v in model.state_dict().items()}
        _write_diffusers_component(
            out / "diffusers" / "vae",
            "AutoencoderKL",
            diffusers_vae_config(model.config),
            vae_to_diffusers(sd, model.config),
        )
    return out


def export(path: str | Path, out: str | Path, ema: bool = True, diffusers: bool = True) -> Path:
    folder = checkpoint_folder(path)
    out = Path(out)
    if OmegaConf.load(folder / "config.yaml").stage == "autoencoder":
        return export_autoencoder(folder, out, ema)
    pipe = pipeline_from_checkpoint(folder, "cpu", ema)
    pipe.save(out)
    if diffusers:
        write_diffusers(pipe, out / "diffusers")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ldm-export", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("checkpoint", help="a checkpoints folder (its latest) or one committed checkpoint folder")
    p.add_argument("--out", required=True)
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--no-diffusers", action="store_true")
    args = p.parse_args(argv)
    out = export(args.checkpoint, args.out, ema=not args.raw, diffusers=not args.no_diffusers)
    folder = checkpoint_folder(args.checkpoint)
    kind = (
        "EMA"
        if uses_ema(folder, not args.raw)
        else "raw (no EMA in the checkpoint)"
        if not args.raw
        else "raw"
    )
    print(f"exported {folder} ({kind} weights) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
