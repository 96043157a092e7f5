"""Reconstruction quality of an autoencoder: PSNR, SSIM (Gaussian window, as Wang et al. 2004) and LPIPS."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per image, in dB, for [0, data_range] images (B, C, H, W); computed in float64."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp(min=1e-20))


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image over channels, Gaussian window 11 / sigma 1.5, valid region only (skimage's
    ``structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)``)."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    g = _gaussian()
    win = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).contiguous()

    def blur(x):
        return F.conv2d(x, win, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    va, vb, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def reconstruct(autoencoder, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images through the autoencoder (posterior mode), back in [0, 1]."""
    x = images * 2 - 1
    z = autoencoder.encode_latents(x, sample=False)
    return (autoencoder.decode(z).float() / 2 + 0.5).clamp(0, 1)


def reconstruction_metrics(autoencoder, images: torch.Tensor, lpips_model=None) -> dict:
    rec = reconstruct(autoencoder, images)
    out = {"psnr": psnr(images, rec), "ssim": ssim(images, rec)}
    if lpips_model is not None:
        with torch.no_grad():
            out["lpips"] = lpips_model(images * 2 - 1, rec * 2 - 1).flatten().double()
    return out
