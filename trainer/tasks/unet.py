"""The UNet stage: latents from the frozen autoencoder (encoded on the fly from images, or read from latent
shards), conditions from the text/class encoder, the diffusion objective on the UNet inside DeepSpeed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.objectives import DiffusionObjective
from ..engine.deepspeed_setup import make_engine
from ..models.text_encoders import ClassEmbedder
from ..pipeline import GenerateOptions, LatentDiffusionPipeline
from .common import InfGrad, images_to_model, random_masks


class DiffusionModel(nn.Module):
    """What the engine wraps: the UNet and, when it is trained too, the text encoder."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        if text_encoder is not None:
            self.text_encoder = text_encoder

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        captions: list | None = None,
    ) -> torch.Tensor:
        if captions is not None:
            context = self.text_encoder(captions).tokens
        return self.unet(x, t, context.to(x.dtype))


class UNetTask:
    name = "unet"

    def __init__(self, cfg, models: dict, device: torch.device, rank: int, scale_factor: float):
        self.cfg, self.device, self.rank = cfg, device, rank
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.autoencoder = models["autoencoder"].to(device).eval().requires_grad_(False)
        self.text_encoder = models["text_encoder"].to(device)
        self.train_text = bool(getattr(self.text_encoder, "trainable", False))
        self.scale_factor = scale_factor
        module = DiffusionModel(models["unet"], self.text_encoder if self.train_text else None).to(
            device
        )  # channels-last applies to activations; DeepSpeed needs contiguous params
        self.engine = make_engine(
            module, cfg.deepspeed, cfg.optim, cfg.data.batch_size, cfg.precision, cfg.optim.lr
        )
        if cfg.precision == "bf16":
            self.autoencoder.to(self.dtype)
            if not self.train_text:
                self.text_encoder.to(self.dtype)
        self.objective = DiffusionObjective(cfg.diffusion)
        self.generator = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)

    @property
    def engines(self) -> dict:
        return {"model": self.engine}

    @property
    def ema_module(self) -> nn.Module:
        return self.engine.module

    def conditions(self, batch: dict) -> list:
        if isinstance(self.text_encoder, ClassEmbedder):  # class labels stored as the caption text
            return [int(c) if c.strip() else -1 for c in batch["caption"]]
        return list(batch["caption"])

    def latents(self, batch: dict) -> torch.Tensor:
        sample = self.cfg.posterior == "sample"
        if "latent_mean" in batch:  # precomputed latent shards: a fresh posterior sample every time
            mean = batch["latent_mean"].to(self.device, torch.float32)
            if not sample:
                return mean * self.scale_factor
            std = batch["latent_std"].to(self.device, torch.float32)
            noise = torch.randn(mean.shape, generator=self.generator, device=self.device)
            return (mean + std * noise) * self.scale_factor
        images = images_to_model(batch["image"], self.device, self.dtype, self.cfg.channels_last)
        with torch.no_grad():
            z = self.autoencoder.encode_latents(images, sample=sample, generator=self.generator)
        return z.float() * self.scale_factor

    def concat_inputs(self, batch: dict, latents: torch.Tensor) -> torch.Tensor | None:
        kind = self.cfg.concat
        if kind == "none":
            return None
        if "image" not in batch:
            raise ValueError(f"concat={kind} needs images: train it from image shards (data.kind=images)")
        images = images_to_model(batch["image"], self.device, self.dtype, False)
        if (
            kind == "inpaint"
        ):  # mask (1 = repaint) and the latents of the masked image, as SD's inpainting model
            masks = random_masks(images.shape[0], images.shape[-2:], self.generator, self.device)
            with torch.no_grad():
                masked = self.autoencoder.encode_latents(images * (masks < 0.5).to(images.dtype))
            small = F.interpolate(masks, size=latents.shape[-2:], mode="nearest")
            return torch.cat([small, masked.float() * self.scale_factor], dim=1)
        if kind == "superres":  # the low-resolution image (1/f of the size), at latent resolution
            low = F.interpolate(images.float(), size=latents.shape[-2:], mode="area")
            return low
        raise ValueError(f"concat must be none | inpaint | superres, got {kind!r}")

    def forward_backward(self, batch: dict, step: int, faults) -> torch.Tensor:
        """One micro-batch: loss, backward through the engine. Returns the (detached) loss."""
        latents = self.latents(batch)
        conds = self.conditions(batch)
        context = None
        if "text_tokens" in batch and not self.train_text:  # stored by ldm-precompute
            context = batch["text_tokens"].to(self.device, self.dtype)
        elif not self.train_text:
            with torch.no_grad():
                context = self.text_encoder(conds).tokens.to(self.dtype)

        def model_fn(z, t):
            z = z.to(self.dtype)
            if self.cfg.channels_last:
                z = z.contiguous(memory_format=torch.channels_last)
            return self.engine(z, t, context=context, captions=conds if self.train_text else None)

        loss, _ = self.objective.loss(
            model_fn, latents, self.generator, concat=self.concat_inputs(batch, latents)
        )
        if step in faults.nan_loss_at and self.rank == torch.distributed.get_world_size() - 1:
            loss = loss * float("nan")
        if step in faults.inf_grad_at:
            loss = InfGrad.apply(loss)
        self.engine.backward(loss)
        return loss.detach()

    def pipeline(self) -> LatentDiffusionPipeline:
        """The current (raw) weights as a pipeline, for sample grids."""
        return LatentDiffusionPipeline(
            self.engine.module.unet,
            self.autoencoder,
            self.text_encoder,
            self.cfg.diffusion,
            self.scale_factor,
            self.cfg.concat,
        )

    @torch.no_grad()
    def samples(self, log_cfg, seed: int = 0) -> tuple[torch.Tensor, str]:
        """A grid of the fixed prompts (every rank runs it: ZeRO-3 forwards gather parameters)."""
        self.engine.module.eval()
        prompts = list(log_cfg.sample_prompts)
        opts = GenerateOptions(
            steps=log_cfg.sample_steps,
            guidance=log_cfg.sample_guidance,
            seeds=[seed + i for i in range(len(prompts))],
        )
        images = self.pipeline().generate(prompts, opts) if self.cfg.concat == "none" else None
        self.engine.module.train()
        return images, " | ".join(prompts)
