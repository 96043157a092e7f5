"""The autoencoder stage: generator (autoencoder + the loss's learned log-variance) and patch discriminator,
each in its own DeepSpeed engine with its own optimizer; the discriminator starts at ``loss.disc_start``."""

from __future__ import annotations

from dataclasses import replace

import torch
from omegaconf import OmegaConf
from torch import nn

from ..engine.deepspeed_setup import make_engine
from ..models.ae_loss import AutoencoderLoss
from .common import InfGrad, images_to_model


class Generator(nn.Module):
    def __init__(self, autoencoder: nn.Module, logvar: nn.Parameter):
        super().__init__()
        self.autoencoder = autoencoder
        self.logvar = logvar  # shared with the loss, optimized with the autoencoder

    def forward(self, x: torch.Tensor):
        return self.autoencoder(x)


class AutoencoderTask:
    name = "autoencoder"

    def __init__(self, cfg, models: dict, device: torch.device, rank: int, scale_factor: float):
        if cfg.deepspeed.zero_stage > 2:
            raise ValueError(
                "deepspeed.zero_stage=3 is not supported for stage=autoencoder: the adaptive GAN "
                "weight differentiates with respect to the decoder's last layer (use ZeRO 0-2)"
            )
        self.cfg, self.device, self.rank = cfg, device, rank
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.loss = AutoencoderLoss(cfg.loss, models["autoencoder"].config.in_channels)
        if self.loss.lpips is not None:
            self.loss.lpips.to(device)
        gen = Generator(models["autoencoder"], self.loss.logvar).to(
            device
        )  # channels-last applies to activations; DeepSpeed needs contiguous params
        bs = cfg.data.batch_size
        self.engine = make_engine(gen, cfg.deepspeed, cfg.optim, bs, cfg.precision, cfg.optim.lr)
        disc_optim = replace(OmegaConf.to_object(cfg.optim), lr=cfg.optim.disc_lr or cfg.optim.lr)
        self.disc = make_engine(
            self.loss.discriminator.to(device), cfg.deepspeed, disc_optim, bs, cfg.precision, disc_optim.lr
        )
        self.fixed: torch.Tensor | None = None
        self._last_input: torch.Tensor | None = None
        conv_out = self.engine.module.autoencoder.decoder.conv_out
        conv_out.register_forward_pre_hook(self._keep_last_input)

    def _keep_last_input(self, module, args) -> None:
        self._last_input = args[0].detach()

    @property
    def engines(self) -> dict:
        return {"model": self.engine, "disc": self.disc}

    @property
    def ema_module(self) -> nn.Module:
        return self.engine.module

    def forward_backward(self, batch: dict, step: int, faults) -> torch.Tensor:
        x = images_to_model(batch["image"], self.device, self.dtype, self.cfg.channels_last)
        if self.fixed is None:
            self.fixed = x[:8].detach().clone()
        rec, reg = self.engine(x)
        d_weight = None
        if self.loss.disc_factor(step) > 0:
            conv = self.engine.module.autoencoder.decoder.conv_out
            d_weight = self.loss.adaptive_weight_at(x, conv, self._last_input)
        g_loss, logs = self.loss.generator_loss(x, rec, reg, step, d_weight=d_weight)
        if step in faults.nan_loss_at and self.rank == torch.distributed.get_world_size() - 1:
            g_loss = g_loss * float("nan")
        if step in faults.inf_grad_at:
            g_loss = InfGrad.apply(g_loss)
        self.engine.backward(g_loss)
        self.last_logs = {k: float(v) for k, v in logs.items() if v.numel() == 1}
        self.disc_active = self.loss.disc_factor(step) > 0
        if self.disc_active:
            d_loss, d_logs = self.loss.discriminator_loss(x, rec, step, disc=self.disc)
            self.disc.backward(d_loss)
            self.last_logs.update({k: float(v) for k, v in d_logs.items()})
        return g_loss.detach()

    @torch.no_grad()
    def samples(self, log_cfg, seed: int = 0) -> tuple[torch.Tensor | None, str]:
        """Originals (top row) and their reconstructions (bottom row)."""
        if self.fixed is None:
            return None, ""
        self.engine.module.eval()
        rec, _ = self.engine.module(self.fixed)
        self.engine.module.train()
        both = torch.cat([self.fixed.float(), rec.float()]) / 2 + 0.5
        return both.clamp(0, 1), "top: inputs, bottom: reconstructions"
