"""The autoencoder's training loss (LDM / VQGAN recipe): pixel L1 or L2 + LPIPS perceptual distance, a learned
output log-variance, a patch-GAN discriminator with an adaptive weight from the gradients at the decoder's last
layer, switched on after ``disc_start`` steps, plus the KL or codebook term."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# torchvision's file names for the LPIPS backbones (what lpips would download into the torch hub cache)
LPIPS_BACKBONES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


@dataclass
class AutoencoderLossConfig:
    pixel_loss: str = "l1"  # l1 | l2
    perceptual_weight: float = 1.0
    lpips_net: str = "vgg"  # vgg | alex | squeeze
    lpips_backbone_path: str = ""  # torchvision backbone weights; "" -> $TORCH_HOME/hub/checkpoints/<file>
    lpips_random_backbone: bool = False  # a random backbone: a stand-in for tests, never for training
    # L1 of the error's image gradients, per pixel: sharp edges where LPIPS is absent
    edge_weight: float = 0.0
    learn_logvar: bool = True
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: str = "hinge"  # hinge | vanilla
    disc_layers: int = 3
    disc_channels: int = 64


def lpips_backbone_file(cfg: AutoencoderLossConfig) -> Path:
    if cfg.lpips_backbone_path:
        return Path(cfg.lpips_backbone_path).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[cfg.lpips_net]


def build_lpips(cfg: AutoencoderLossConfig) -> nn.Module:
    """A frozen LPIPS metric. Its linear heads ship with the ``lpips`` package; the torchvision backbone is read
    from ``loss.lpips_backbone_path`` (or the torch hub cache) and never downloaded."""
    import lpips
    import torchvision

    if cfg.lpips_net not in LPIPS_BACKBONES:
        raise ValueError(f"loss.lpips_net must be one of {sorted(LPIPS_BACKBONES)}, got {cfg.lpips_net!r}")
    path = lpips_backbone_file(cfg)
    if not cfg.lpips_random_backbone and not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs its {cfg.lpips_net} backbone weights at {path} (loss.lpips_backbone_path, or "
            f"TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}); copy "
            f"https://download.pytorch.org/models/{LPIPS_BACKBONES[cfg.lpips_net]} there. "
            "Tests may set loss.lpips_random_backbone=true"
        )
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        metric = lpips.LPIPS(net=cfg.lpips_net, pretrained=True, pnet_rand=True, verbose=False)
    if not cfg.lpips_random_backbone:
        arch = {
            "vgg": torchvision.models.vgg16,
            "alex": torchvision.models.alexnet,
            "squeeze": torchvision.models.squeezenet1_1,
        }[cfg.lpips_net]()
        arch.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        for stage in metric.net.children():
            for name, module in stage.named_children():
                module.load_state_dict(arch.features[int(name)].state_dict())
    metric.eval().requires_grad_(False)
    return metric


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix): a map of real/fake logits over overlapping patches."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def vanilla_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


PIXEL_LOSSES = {"l1": torch.abs, "l2": torch.square}  # loss.pixel_loss, on (x - reconstruction)


def edge_error(x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Per pixel, |vertical| + |horizontal| finite difference of the error ``x - rec`` (zero on the last row and
    column): what an L2 loss barely sees when a reconstruction rounds a corner or softens an edge."""
    e = x - rec
    dh = F.pad((e[:, :, 1:] - e[:, :, :-1]).abs(), (0, 0, 0, 1))
    dw = F.pad((e[..., 1:] - e[..., :-1]).abs(), (0, 1))
    return dh + dw


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}  # loss.disc_loss


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives. Holds the discriminator and the learned log-variance;
    LPIPS is frozen and kept out of ``parameters()``' trainable set."""

    def __init__(self, cfg: AutoencoderLossConfig, image_channels: int = 3):
        super().__init__()
        if cfg.pixel_loss not in PIXEL_LOSSES or cfg.disc_loss not in DISC_LOSSES:
            raise ValueError(
                f"loss.pixel_loss must be one of {sorted(PIXEL_LOSSES)} and loss.disc_loss one of "
                f"{sorted(DISC_LOSSES)}, got {cfg.pixel_loss!r}, {cfg.disc_loss!r}"
            )
        self.cfg = cfg
        self.lpips = build_lpips(cfg) if cfg.perceptual_weight > 0 else None
        self.logvar = nn.Parameter(
            torch.zeros(1), requires_grad=cfg.learn_logvar
        )  # 1-d: DeepSpeed broadcasts bytes
        self.discriminator = NLayerDiscriminator(image_channels, cfg.disc_channels, cfg.disc_layers)

    def disc_factor(self, step: int) -> float:
        return self.cfg.disc_factor if step >= self.cfg.disc_start else 0.0

    def reconstruction(self, x: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Negative log-likelihood of ``x`` under the decoder (pixel + perceptual), per-batch mean."""
        pix = PIXEL_LOSSES[self.cfg.pixel_loss](x - rec)
        per_pixel = pix
        logs = {"rec_loss": pix.mean().detach()}
        if self.cfg.edge_weight > 0:
            edges = edge_error(x, rec)
            per_pixel = per_pixel + self.cfg.edge_weight * edges
            logs["edge_loss"] = edges.mean().detach()
        if self.lpips is not None:
            p = self.lpips(x.float(), rec.float()).to(pix.dtype)
            per_pixel = per_pixel + self.cfg.perceptual_weight * p
            logs["p_loss"] = p.mean().detach()
        nll = per_pixel / torch.exp(self.logvar) + self.logvar
        return nll.sum() / x.shape[0], logs

    def adaptive_weight(
        self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """Balance the GAN term against the reconstruction: ||grad nll|| / ||grad g_loss|| at the last layer."""
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        w = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return w.clamp(0.0, 1e4).detach() * self.cfg.disc_weight

    def g_loss(self, rec: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial term; the discriminator's weights get no gradient from it."""
        self.discriminator.requires_grad_(False)
        try:
            return -self.discriminator(rec).mean()
        finally:
            self.discriminator.requires_grad_(True)

    def adaptive_weight_at(self, x: torch.Tensor, conv: nn.Conv2d, conv_input: torch.Tensor) -> torch.Tensor:
        """The adaptive weight at the decoder's last convolution ``conv``, on a side graph.

        That convolution's weight W reaches the loss only through it, so recomputing the reconstruction from
        the convolution's (detached) input with a leaf copy of W gives exactly dL/dW - without a backward pass
        through the training graph (which a DeepSpeed engine would take for a training backward).
        """
        weight = conv.weight.detach().requires_grad_(True)
        bias = conv.bias.detach() if conv.bias is not None else None
        h = conv_input.detach().to(weight.dtype)  # bf16 under precision=bf16-autocast: the side graph is fp32
        rec = F.conv2d(h, weight, bias, stride=conv.stride, padding=conv.padding)
        nll, _ = self.reconstruction(x, rec)
        return self.adaptive_weight(nll, self.g_loss(rec), weight)

    def generator_loss(
        self,
        x: torch.Tensor,
        rec: torch.Tensor,
        reg: dict,
        step: int,
        last_layer: torch.Tensor | None = None,
        d_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Loss for the autoencoder's parameters (and the log-variance). The GAN term's adaptive weight is
        ``d_weight`` when given (computed elsewhere), else computed at ``last_layer``."""
        nll, logs = self.reconstruction(x, rec)
        loss = nll
        if "kl" in reg:
            kl = reg["kl"].sum() / x.shape[0]
            loss = loss + self.cfg.kl_weight * kl
            logs["kl_loss"] = kl.detach()
        if "codebook_loss" in reg:
            loss = loss + self.cfg.codebook_weight * reg["codebook_loss"]
            logs.update(codebook_loss=reg["codebook_loss"].detach(), codebook_usage=reg["usage"].detach())
        factor = self.disc_factor(step)
        if factor > 0:
            g_loss = self.g_loss(rec)
            if d_weight is None:
                if last_layer is None:
                    raise ValueError(
                        "generator_loss needs last_layer or d_weight once the discriminator is on"
                    )
                d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            loss = loss + d_weight * factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs.update(nll_loss=nll.detach(), logvar=self.logvar.detach(), disc_factor=torch.tensor(factor))
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, rec: torch.Tensor, step: int, disc=None
    ) -> tuple[torch.Tensor, dict]:
        """Loss for the discriminator: real images vs (detached) reconstructions. ``disc`` calls the
        discriminator (a DeepSpeed engine in training; the module itself by default)."""
        disc = disc or self.discriminator
        real, fake = disc(x.detach()), disc(rec.detach())
        d = DISC_LOSSES[self.cfg.disc_loss](real, fake)
        loss = self.disc_factor(step) * d
        return loss, {
            "d_loss": d.detach(),
            "logits_real": real.mean().detach(),
            "logits_fake": fake.mean().detach(),
        }
