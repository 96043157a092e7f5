"""FID and KID between two sets of images, from Inception-v3 pool features (weights from a path; nothing is
downloaded). The statistics are computed in float64; any feature extractor can be passed in (tests use a tiny
random network to check the math against a reference)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

Features = Callable[[torch.Tensor], torch.Tensor]  # [0, 1] images (B, 3, H, W) -> (B, D)


def inception_features(weights: str | Path, device: str = "cpu") -> Features:
    """torchvision's Inception-v3 (IMAGENET1K_V1 weights from ``weights``), 2048-d pool features.

    Note: published FIDs use the TF 'pt_inception-2015-12-05' weights; numbers from these weights are
    comparable with each other, not with papers."""
    import torchvision

    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.inception_weights: {path} does not exist (torchvision inception_v3 state dict, "
            "e.g. inception_v3_google-0cc3c7bd.pth)"
        )
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()
    model.eval().to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.to(device).float(), size=(299, 299), mode="bilinear", antialias=True)
        return model((x - mean) / std).double().cpu()

    return features


def collect(features: Features, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([features(b) for b in batches]).double()


def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = feats.double()
    return feats.mean(0), torch.cov(feats.T)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(root1 @ s2 @ root1)
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * torch.trace(cross))


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 10, subset_size: int = 1000, seed: int = 0):
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3, averaged over
    random subsets. Returns (mean, std)."""
    real, fake = real.double(), fake.double()
    d = real.shape[1]
    n = min(subset_size, len(real), len(fake))
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:n]]
        y = fake[torch.randperm(len(fake), generator=g)[:n]]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        mmd = (
            (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
            - 2 * kxy.mean()
        )
        values.append(float(mmd))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0
