"""Small pieces shared by the stage tasks."""

from __future__ import annotations

import torch


def images_to_model(images: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool):
    """uint8 (B, 3, H, W) from the loader -> [-1, 1] on the device."""
    x = images.to(device, non_blocking=True).to(dtype) / 127.5 - 1.0
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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


class InfGrad(torch.autograd.Function):
    """Fault injection: identity forward, infinite gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")
