"""The perceptual autoencoder of latent diffusion: a convolutional encoder/decoder that downsamples by
f = 2^(len(ch_mult)-1), regularized either by a KL term (diagonal Gaussian posterior) or by vector quantization.

Module names follow the CompVis/Stability layout (``encoder.down.0.block.0``, ``quant_conv``...), so the
``first_stage_model.*`` weights of a Stable Diffusion checkpoint load as they are; ``convert.py`` maps them to
and from diffusers' ``AutoencoderKL``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import check_backend, dot_product_attention
from .norm import GroupNorm


@dataclass
class AutoencoderConfig:
    _target_: str = "trainer.models.autoencoder.AutoencoderKL"  # or trainer.models.autoencoder.VQModel
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(
        default_factory=list
    )  # feature-map sizes (at `resolution`) with attention
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4  # latent channels the diffusion model sees
    norm_groups: int = 32
    dropout: float = 0.0
    attention: str = "sdpa"
    scale_factor: float = 0.0  # latents are multiplied by this before diffusion; 0: measured from the data
    n_embed: int = 8192  # VQ codebook size
    beta: float = 0.25  # VQ commitment weight

    @property
    def downsampling(self) -> int:
        """The factor f between image and latent size."""
        return 2 ** (len(self.ch_mult) - 1)


class DiagonalGaussian:
    """The KL autoencoder's posterior q(z|x) = N(mean, exp(logvar))."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantization with a straight-through gradient and a commitment loss."""

    def __init__(self, n_embed: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.n_embed, self.beta = n_embed, beta
        self.embedding = nn.Embedding(n_embed, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Returns (quantized z with straight-through gradient, loss, {indices, usage, perplexity})."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codes = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        idx = dist.argmin(dim=1)
        zq = self.embedding(idx).view(b, h, w, c).permute(0, 3, 1, 2)
        loss = self.beta * F.mse_loss(z, zq.detach()) + F.mse_loss(zq, z.detach())
        zq = z + (zq - z).detach()
        counts = torch.bincount(idx, minlength=self.n_embed).float()
        probs = counts / counts.sum()
        info = {
            "indices": idx.view(b, h, w),
            "usage": (counts > 0).float().mean(),
            "perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
        }
        return zq, loss, info


def _norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the feature map (1x1 convolutions, as in the CompVis checkpoints)."""

    def __init__(self, channels: int, groups: int, backend: str = "sdpa"):
        super().__init__()
        self.backend = backend
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = dot_product_attention(q, k, v, self.backend).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(
        self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str
    ):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
        if resample is not None:
            setattr(self, name, resample)


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int, dropout: float, backend: str):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups, dropout)
        self.attn_1 = AttnBlock(ch, groups, backend)
        self.block_2 = ResnetBlock(ch, ch, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig, double_z: bool):
        super().__init__()
        g, res = cfg.norm_groups, cfg.resolution
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, cfg.ch * mult, g, cfg.dropout))
                block_in = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, g, cfg.attention))
            last = level == len(cfg.ch_mult) - 1
            self.down.append(_Level(blocks, attns, None if last else Downsample(block_in), "downsample"))
            res = res if last else res // 2
        self.mid = _Mid(block_in, g, cfg.dropout, cfg.attention)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g = cfg.norm_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsampling
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, g, cfg.dropout, cfg.attention)
        levels: list[nn.Module] = []
        for level in reversed(range(len(cfg.ch_mult))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level], g, cfg.dropout))
                block_in = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, g, cfg.attention))
            levels.insert(0, _Level(blocks, attns, Upsample(block_in) if level else None, "upsample"))
            res = res * 2 if level else res
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """The encoder/decoder pair both regularizations share (``AutoencoderKL``, ``VQModel``)."""

    Config = AutoencoderConfig
    double_z = True

    def __init__(self, config: AutoencoderConfig | None = None, **fields):
        super().__init__()
        fields.pop("_target_", None)
        cfg = config if config is not None else AutoencoderConfig(**fields)
        self.config = cfg
        check_backend(cfg.attention)
        if cfg.downsampling not in (1, 2, 4, 8, 16, 32):
            raise ValueError(
                f"autoencoder: len(ch_mult) gives f={cfg.downsampling}; LDM studies f in 1, 2, 4, 8, 16, 32"
            )
        self.encoder = Encoder(cfg, self.double_z)
        self.decoder = Decoder(cfg)
        zc = 2 * cfg.z_channels if self.double_z else cfg.z_channels
        ec = 2 * cfg.embed_dim if self.double_z else cfg.embed_dim
        self.quant_conv = nn.Conv2d(zc, ec, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight (the GAN loss's adaptive weight is computed from gradients there)."""
        return self.decoder.conv_out.weight


class AutoencoderKL(Autoencoder):
    """KL-regularized autoencoder (Stable Diffusion's VAE)."""

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def encode_latents(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Unscaled latents: the posterior mean, or a sample from it."""
        post = self.encode(x)
        return post.sample(generator) if sample else post.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, dict]:
        """Reconstruction and the regularization terms ``{"kl": (B,), "posterior": ...}``."""
        post = self.encode(x)
        rec = self.decode(post.sample() if sample else post.mode())
        return rec, {"kl": post.kl(), "posterior": post}


class VQModel(Autoencoder):
    """VQ-regularized autoencoder. Diffusion runs on the continuous latents; the decoder quantizes them."""

    double_z = False

    def __init__(self, config: AutoencoderConfig | None = None, **fields):
        super().__init__(config, **fields)
        self.quantize = VectorQuantizer(self.config.n_embed, self.config.embed_dim, self.config.beta)

    def encode_latents(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        zq, _, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(zq))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, dict]:
        """Reconstruction and ``{"codebook_loss": scalar, "usage", "perplexity", "indices"}``."""
        zq, loss, info = self.quantize(self.encode_latents(x))
        return self.decoder(self.post_quant_conv(zq)), {"codebook_loss": loss, **info}


@torch.no_grad()
def measure_scale_factor(
    autoencoder: nn.Module,
    images: Iterable[torch.Tensor],
    limit: int,
    generator: torch.Generator | None = None,
) -> float:
    """1 / std of posterior samples of the first ``limit`` images (batches in [-1, 1]), as LDM measures the
    latent scale factor (``ldm-precompute`` and the UNet stage's on-the-fly path both use this)."""
    total, sq, count, seen = 0.0, 0.0, 0, 0
    for x in images:
        z = autoencoder.encode_latents(x, sample=True, generator=generator).double()
        total, sq, count = total + z.sum().item(), sq + z.pow(2).sum().item(), count + z.numel()
        seen += x.shape[0]
        if seen >= limit:
            break
    if count == 0:
        raise RuntimeError("no valid image to estimate the latent scale factor from")
    mean = total / count
    return float(1.0 / ((sq / count - mean**2) ** 0.5))
