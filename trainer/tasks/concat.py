"""Conditioning by concatenation (``task.concat._target_``): extra UNet input channels appended to the noisy
latents, in training and in sampling. Inpainting (mask + latents of the masked image, as SD's inpainting model),
super-resolution (the low-resolution image at latent resolution, as LDM's SR models) and semantic synthesis
(the segmentation map, one channel per class, at latent resolution, as LDM's semantic models).

The extra channels are computed at whatever latent size is sampled, so a model sampled beyond its training size
(a larger low-resolution image, a larger segmentation map) gets its condition at that size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

Encode = Callable[[torch.Tensor], torch.Tensor]  # [-1, 1] images -> scaled latents (posterior means)


@runtime_checkable
class ConcatCondition(Protocol):
    def channels(self, latent_channels: int) -> int:
        """How many input channels this adds to the UNet."""
        ...

    def needs(self) -> frozenset[str]:
        """The batch keys training needs (``image``: train from image shards)."""
        ...

    def training_input(
        self,
        batch: dict,
        images: torch.Tensor,
        latents: torch.Tensor,
        encode: Encode,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The extra channels for a training batch (``images`` in [-1, 1], ``latents`` scaled)."""
        ...

    def sampling_inputs(self) -> frozenset[str]:
        """The ``generate`` arguments this condition consumes (``mask``, ``low_res``, ``init_image``,
        ``segmentation``)."""
        ...

    def sampling_input(self, shape: tuple[int, ...], encode: Encode, inputs: dict) -> torch.Tensor:
        """The extra channels for sampling latents of ``shape`` from the user's ``inputs``."""
        ...


def random_masks(n: int, size, generator: torch.Generator, device) -> torch.Tensor:
    """Inpainting training masks (1 = repaint): one random rectangle covering 10-60% of each side."""
    h, w = size
    masks = torch.zeros(n, 1, h, w, device=device)
    r = torch.rand(n, 4, generator=generator, device=generator.device).cpu()
    for i in range(n):
        mh, mw = int(h * (0.1 + 0.5 * r[i, 0])), int(w * (0.1 + 0.5 * r[i, 1]))
        top, left = int((h - mh) * r[i, 2]), int((w - mw) * r[i, 3])
        masks[i, :, top : top + mh, left : left + mw] = 1.0
    return masks


@dataclass
class InpaintConfig:
    _target_: str = "trainer.tasks.concat.InpaintConcat"


class InpaintConcat:
    """Mask (1 = repaint) at latent resolution and the latents of the masked image (SD inpainting)."""

    Config = InpaintConfig

    def __init__(self, config: InpaintConfig | None = None):
        self.config = config or InpaintConfig()

    def channels(self, latent_channels: int) -> int:
        return latent_channels + 1

    def needs(self) -> frozenset[str]:
        return frozenset({"image"})

    def training_input(self, batch, images, latents, encode, generator):
        masks = random_masks(images.shape[0], images.shape[-2:], generator, images.device)
        with torch.no_grad():
            masked = encode(images * (masks < 0.5).to(images.dtype))
        small = F.interpolate(masks, size=latents.shape[-2:], mode="nearest")
        return torch.cat([small, masked.float()], dim=1)

    def sampling_inputs(self) -> frozenset[str]:
        return frozenset({"init_image", "mask"})

    def sampling_input(self, shape, encode, inputs):
        image, mask = inputs.get("init_image"), inputs.get("mask")
        if image is None or mask is None:
            raise ValueError("this is an inpainting model: give an init image and a mask (white = repaint)")
        masked = encode(image * (mask.to(image.device) < 0.5))
        small = F.interpolate(mask.to(masked.device).float(), size=shape[-2:], mode="nearest")
        return torch.cat([small, masked.float()], dim=1)


@dataclass
class SuperResConfig:
    _target_: str = "trainer.tasks.concat.SuperResConcat"


class SuperResConcat:
    """The low-resolution image resized to latent resolution (LDM's super-resolution conditioning)."""

    Config = SuperResConfig

    def __init__(self, config: SuperResConfig | None = None):
        self.config = config or SuperResConfig()

    def channels(self, latent_channels: int) -> int:
        return 3

    def needs(self) -> frozenset[str]:
        return frozenset({"image"})

    def training_input(self, batch, images, latents, encode, generator):
        return F.interpolate(images.float(), size=latents.shape[-2:], mode="area")

    def sampling_inputs(self) -> frozenset[str]:
        return frozenset({"low_res"})

    def sampling_input(self, shape, encode, inputs):
        low = inputs.get("low_res")
        if low is None:
            raise ValueError("this is a super-resolution model: give a low-resolution image")
        return F.interpolate(low.float(), size=shape[-2:], mode="bicubic")


@dataclass
class SemanticConfig:
    _target_: str = "trainer.tasks.concat.SemanticConcat"
    num_classes: int = (
        25  # label values in the maps: 0 .. num_classes - 1 (synthetic shapes: background + 24)
    )
    key: str = "seg"  # the batch key of the segmentation map (data.maps: [seg.png])


class SemanticConcat:
    """The segmentation map as one channel per class, each the fraction of a latent cell that class covers."""

    Config = SemanticConfig

    def __init__(self, config: SemanticConfig | None = None):
        self.config = config or SemanticConfig()

    def channels(self, latent_channels: int) -> int:
        return self.config.num_classes

    def needs(self) -> frozenset[str]:
        return frozenset({self.config.key})

    def one_hot(self, labels: torch.Tensor, size) -> torch.Tensor:
        """Integer maps (B, 1, H, W) -> class fractions (B, num_classes, *size)."""
        labels = labels.long()[:, 0]
        top = int(labels.max())
        if top >= self.config.num_classes or int(labels.min()) < 0:
            raise ValueError(f"segmentation label {top} is outside 0..{self.config.num_classes - 1} "
                             "(task.concat.num_classes)")  # fmt: skip
        onehot = F.one_hot(labels, self.config.num_classes).permute(0, 3, 1, 2).float()
        return F.interpolate(onehot, size=tuple(size), mode="area")

    def training_input(self, batch, images, latents, encode, generator):
        return self.one_hot(batch[self.config.key].to(latents.device), latents.shape[-2:])

    def sampling_inputs(self) -> frozenset[str]:
        return frozenset({"segmentation"})

    def sampling_input(self, shape, encode, inputs):
        seg = inputs.get("segmentation")
        if seg is None:
            raise ValueError("this is a semantic synthesis model: give a segmentation map (integer labels)")
        return self.one_hot(seg, shape[-2:])
