"""Saving images and grids (PNG), shared by ldm-sample, training sample logs and reports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from data_pipeline.atomic import atomic_save


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[0, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), rounding like diffusers' numpy_to_pil."""
    return (
        (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    )


def grid_image(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)
    return Image.fromarray(to_uint8(grid[None])[0])


def save_images(images: torch.Tensor, folder: str | Path, names: list[str]) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for arr, name in zip(to_uint8(images), names, strict=True):
        path = folder / name
        atomic_save(path, lambda tmp, arr=arr: Image.fromarray(arr).save(tmp, format="PNG"))
        paths.append(path)
    return paths


def load_image(path: str | Path, size: tuple[int, int] | None = None, mode: str = "RGB") -> torch.Tensor:
    """An image file as (1, C, H, W) in [0, 1], optionally resized to (height, width)."""
    img = Image.open(path).convert(mode)
    if size is not None:
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def load_label_map(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A one-channel label map (a segmentation PNG) as integer labels (1, 1, H, W), resized (nearest) to
    (height, width) when given."""
    img = Image.open(path)
    if img.mode not in ("L", "P"):
        raise ValueError(f"{path}: a label map must be a one-channel (L or P) image, not {img.mode}")
    if size is not None:
        img = img.resize((size[1], size[0]), Image.NEAREST)
    return torch.from_numpy(np.array(img, dtype=np.int64))[None, None]
