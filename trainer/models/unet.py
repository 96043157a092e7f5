"""The denoising UNet of latent diffusion: ResBlocks with timestep embedding, SpatialTransformers with self- and
cross-attention to the conditioning tokens and a GEGLU feed-forward, down and up paths joined by skips.

Module names follow the CompVis/Stability layout (``input_blocks``, ``middle_block``, ``output_blocks``), so a
Stable Diffusion checkpoint's ``model.diffusion_model.*`` weights load as they are; ``convert.py`` maps them to
and from diffusers' ``UNet2DConditionModel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttention, check_backend
from .norm import GroupNorm


@dataclass
class UNetConfig:
    """Shape of the UNet (CompVis naming). Heads: give ``num_heads`` (SD 1.x: 8) or ``head_dim`` (SD 2.x: 64)."""

    _target_: str = "trainer.models.unet.UNetModel"
    in_channels: int = 4  # latent channels, plus concat conditioning (inpainting: 4 + 4 + 1)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(
        default_factory=lambda: [4, 2, 1]
    )  # downsampling rates with attention
    num_heads: int = 8
    head_dim: int = -1  # when > 0, heads = channels // head_dim (overrides num_heads)
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    num_classes: int = 0  # > 0: add a class-label embedding to the timestep embedding
    norm_groups: int = 32
    dropout: float = 0.0
    attention: str = "sdpa"  # sdpa | xformers | math
    gradient_checkpointing: bool = False
    sample_size: int = 64  # latent size the model is meant for (diffusers' config field)

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of the attention at a level with ``channels`` channels."""
        if self.head_dim > 0:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads

    @property
    def downsampling(self) -> int:
        """Total spatial downsampling: latent sizes must be divisible by it."""
        return 2 ** (len(self.channel_mult) - 1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, groups: int, dropout: float = 0.0
    ):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        same = out_channels == channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float, backend: str):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout, backend)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, backend)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, transformer blocks over the H*W tokens, project out, residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        groups: int,
        linear: bool,
        dropout: float,
        backend: str,
    ):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, backend) for _ in range(depth)
        )
        self.proj_out = zero_init(nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # a view when x is channels-last
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.linear:
            y = self.proj_out(y)
        return y + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Layers that take the timestep embedding (ResBlock) or the context (SpatialTransformer) get it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """``UNetModel(UNetConfig(...))`` (``unet._target_: trainer.models.unet.UNetModel``)."""

    Config = UNetConfig

    def __init__(self, config: UNetConfig | None = None, **fields):
        super().__init__()
        fields.pop("_target_", None)
        cfg = config if config is not None else UNetConfig(**fields)
        self.config = cfg
        check_backend(cfg.attention)
        for m in cfg.channel_mult:
            if (cfg.model_channels * m) % cfg.norm_groups:
                raise ValueError(
                    f"unet: channels {cfg.model_channels * m} not divisible by norm_groups={cfg.norm_groups}"
                )
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes > 0:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def attention(ch: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_for(ch)
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                cfg.transformer_depth,
                cfg.context_dim,
                groups,
                cfg.use_linear_in_transformer,
                cfg.dropout,
                cfg.attention,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        )
        skips, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups, cfg.dropout)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups, cfg.dropout),
            attention(ch),
            ResBlock(ch, emb_dim, ch, groups, cfg.dropout),
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, mc * mult, groups, cfg.dropout)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            GroupNorm(groups, ch), nn.SiLU(), zero_init(nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        )

    def _run(self, block: TimestepEmbedSequential, h, emb, context):
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the target for noisy latents ``x`` (B, C, H, W) at ``timesteps`` (B,) given ``context``
        (B, tokens, context_dim) and, for class-conditional models, labels ``y`` (B,)."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if self.config.num_classes > 0:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass labels y")
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            hs.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
