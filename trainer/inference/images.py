"""Saving images and grids (PNG), shared by ldm-sample, training sample logs and reports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.atomic import atomic_save


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[0, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), rounding like diffusers' numpy_to_pil."""
    return (
        (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    )


def grid_image(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """(B, 3, H, W) in [0, 1] as one PNG-ready grid, ``nrow`` images a row, white ``padding`` around each
    (torchvision's make_grid layout; written out because importing torchvision costs every ldm-sample seconds)."""
    n, _, h, w = images.shape
    if n == 1:
        return Image.fromarray(to_uint8(images)[0])
    cols = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    tiles = to_uint8(images)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top, left = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
        grid[top : top + h, left : left + w] = tile
    return Image.fromarray(grid)


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
