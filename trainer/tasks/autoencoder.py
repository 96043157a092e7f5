"""The autoencoder stage (``task=autoencoder``): generator (autoencoder + the loss's learned log-variance) and
patch discriminator, each in its own DeepSpeed engine with its own optimizer; the discriminator starts at
``task.loss.disc_start``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, build, to_dataclass
from ..engine.deepspeed_setup import loss_scale, make_engine, set_lr
from ..engine.deepspeed_setup import step as engine_step
from ..models.ae_loss import AutoencoderLoss, AutoencoderLossConfig
from ..models.autoencoder import Autoencoder
from .base import TaskContext
from .common import check_zero_stage, images_to_model, require_images, with_weights


@dataclass
class AutoencoderTaskConfig:
    _target_: str = "trainer.tasks.autoencoder.AutoencoderTask"
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    disc_lr: float = 0.0  # the discriminator's learning rate (0: the optimizer's)


class Generator(nn.Module):
    def __init__(self, autoencoder: nn.Module, logvar: nn.Parameter):
        super().__init__()
        self.autoencoder = autoencoder
        self.logvar = logvar  # shared with the loss, optimized with the autoencoder

    def forward(self, x: torch.Tensor):
        return self.autoencoder(x)


class AutoencoderTask:
    """Perceptual compression: reconstruction (pixel + LPIPS) + KL or VQ + patch-GAN."""

    Config = AutoencoderTaskConfig

    def __init__(self, config: AutoencoderTaskConfig | None = None):
        self.config = config or AutoencoderTaskConfig()

    def check(self, cfg, files: bool = True) -> None:
        check_zero_stage(cfg, highest=2)  # the adaptive GAN weight differentiates at the decoder's last layer
        ae = to_dataclass(cfg.autoencoder, "autoencoder", Autoencoder)
        if cfg.data.resolution % ae.downsampling:
            raise ConfigError(
                f"data.resolution={cfg.data.resolution} is not divisible by the autoencoder's "
                f"downsampling f={ae.downsampling}"
            )

    def build_models(self, cfg) -> dict[str, nn.Module]:
        return {"autoencoder": build(cfg.autoencoder, "autoencoder", Autoencoder)}

    def setup(self, ctx: TaskContext, models: dict[str, nn.Module]) -> None:
        cfg, device = ctx.cfg, ctx.device
        require_images(ctx.data.batch_keys(), "autoencoder")
        self.cfg, self.device, self.rank, self.world = cfg, device, ctx.rank, ctx.world_size
        self.dtype, self.precision = ctx.precision.dtype, ctx.precision
        self.loss = AutoencoderLoss(self.config.loss, models["autoencoder"].config.in_channels)
        if self.loss.lpips is not None:
            self.loss.lpips.to(device)
        gen = Generator(models["autoencoder"], self.loss.logvar).to(device)
        bs, lr = cfg.data.batch_size, ctx.optim.config.lr
        self.engine = make_engine(gen, cfg.deepspeed, ctx.optim, bs, ctx.precision, lr)
        self.lr, self.disc_lr = lr, self.config.disc_lr or lr
        disc = self.loss.discriminator.to(device)
        self.disc = make_engine(disc, cfg.deepspeed, ctx.optim, bs, ctx.precision, self.disc_lr)
        self.fixed: torch.Tensor | None = None
        self._last_input: torch.Tensor | None = None
        self._logs: dict[str, torch.Tensor] = {}
        self._losses: dict[str, list[torch.Tensor]] = {"model": [], "disc": []}  # this step's, per engine
        self.disc_active = False
        self.engine.module.autoencoder.decoder.conv_out.register_forward_pre_hook(self._keep_last_input)

    def _keep_last_input(self, module, args) -> None:
        self._last_input = args[0].detach()

    def engines(self) -> dict:
        return {"model": self.engine, "disc": self.disc}

    def generators(self) -> dict[str, torch.Generator]:
        return {}

    def ema_module(self) -> nn.Module:
        return self.engine.module

    def set_lr_factor(self, factor: float) -> None:
        """Both engines follow the schedule, each from its own base learning rate."""
        set_lr(self.engine, self.lr * factor)
        set_lr(self.disc, self.disc_lr * factor)

    def forward_backward(self, batch: dict, step: int, perturb) -> torch.Tensor:
        x = images_to_model(batch["image"], self.device, self.dtype, self.cfg.channels_last)
        if self.fixed is None:
            self.fixed = x[:8].detach().clone()
        with self.precision.forward_context(self.device):
            rec, reg = self.engine(x)
        if self.precision.autocast:  # the loss (and the GAN's adaptive weight) in fp32
            rec = rec.float()
        d_weight = None
        if self.loss.disc_factor(step) > 0:
            conv = self.engine.module.autoencoder.decoder.conv_out
            d_weight = self.loss.adaptive_weight_at(x, conv, self._last_input)
        g_loss, logs = self.loss.generator_loss(x, rec, reg, step, d_weight=d_weight)
        g_loss = perturb(g_loss, step)
        self.engine.backward(g_loss)
        self._losses["model"].append(g_loss.detach())
        self._logs = {k: v.detach() for k, v in logs.items() if v.numel() == 1}
        self.disc_active = self.loss.disc_factor(step) > 0
        if self.disc_active:
            d_loss, d_logs = self.loss.discriminator_loss(x, rec, step, disc=self.disc)
            self.disc.backward(d_loss)
            self._losses["disc"].append(d_loss.detach())
            self._logs.update(d_logs)
        return g_loss.detach()

    def optimizer_step(self) -> bool:
        losses, self._losses = self._losses, {"model": [], "disc": []}
        applied = engine_step(self.engine, losses["model"])
        if self.disc_active:
            engine_step(self.disc, losses["disc"])
        return applied

    def metrics(self) -> dict[str, torch.Tensor]:
        scale = loss_scale(self.engine)
        extra = {} if scale is None else {"loss_scale": torch.tensor(scale)}
        return {f"ae/{k}": v for k, v in (self._logs | extra).items()}

    def sampling_pipeline(self, weights: dict[str, torch.Tensor]) -> None:
        return None  # reconstructions, not prompts: see samples()

    @torch.no_grad()
    def samples(
        self, prompts: list[str], steps: int, guidance: float, weights: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, str]:
        """Originals (top row) and their reconstructions (bottom row) by the autoencoder with ``weights``."""
        if self.fixed is None:
            return None, ""
        model = with_weights(build(self.cfg.autoencoder, "autoencoder", Autoencoder), weights, "autoencoder.")
        rec, _ = model.to(self.device, self.fixed.dtype)(self.fixed)
        both = torch.cat([self.fixed.float(), rec.float()]) / 2 + 0.5
        return both.clamp(0, 1), "top: inputs, bottom: reconstructions"

    def save_frozen(self, folder: Path, write: bool) -> None:
        return None

    def export(
        self, checkpoint: Path, out: Path, ema: bool = True, formats: frozenset[str] = frozenset()
    ) -> Path:
        from ..inference.export import DEFAULT_FORMATS, export_autoencoder

        return export_autoencoder(checkpoint, out, ema, formats or DEFAULT_FORMATS)
