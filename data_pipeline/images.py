"""Image shards as a data source (``data._target_: data_pipeline.images.ImageShards``): decode, check, crop,
flip and caption choice per sample, batched as uint8 channels-last tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import StreamConfig
from .loader import StreamingLoader
from .samples import DEFAULT_MAX_PIXELS, ImageLimits, caption_text, decode_rgb, metadata
from .tario import RawSample
from .transforms import choose_caption, crop_resize, sample_rng
from .urls import expand_shards


@dataclass
class ImageShardsConfig(StreamConfig):
    _target_: str = "data_pipeline.images.ImageShards"
    crop: str = "center"  # center | random
    hflip: bool = False  # random horizontal flip (p=0.5)
    min_size: int = 0  # skip images whose shorter side is smaller (0: keep all)
    max_aspect: float = 0.0  # skip images more elongated than this (0: keep all)
    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_json: bool = False  # pass each sample's .json sidecar through (as a dict) in the batch


class ImageDecoder:
    """Raw sample -> {pixels, caption, ...}: checks, decode, resize + crop, flip, caption choice and dropout."""

    def __init__(self, cfg: ImageShardsConfig):
        self.cfg = cfg
        self.limits = ImageLimits(cfg.min_size, cfg.max_pixels, cfg.max_aspect)

    def __call__(self, raw: RawSample, epoch: int) -> dict:
        cfg = self.cfg
        rng = sample_rng(cfg.seed, epoch, raw.key)
        text = caption_text(raw, cfg.caption_key)
        pixels, size = decode_rgb(raw, self.limits, cfg.resolution)
        pixels, top_left = crop_resize(pixels, cfg.resolution, cfg.crop, rng)
        if cfg.hflip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        _, caption = choose_caption(text, cfg.caption_choice, rng)
        if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
            caption = ""
        item = {"pixels": pixels, "caption": caption, "key": raw.key, "size": size, "crop": top_left}
        if cfg.keep_json:
            item["json"] = metadata(raw)
        return item


def collate_images(items: list[dict]) -> dict:
    """Stack decoded samples: ``image`` is uint8 (B, 3, H, W) in channels-last memory layout.

    Decoders produce HWC buffers (seen as CHW views), so stacking the HWC views is a plain copy."""
    batch = {
        "image": torch.stack([it["pixels"].permute(1, 2, 0) for it in items]).permute(0, 3, 1, 2),
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "original_size": torch.tensor([it["size"] for it in items], dtype=torch.long),
        "crop_top_left": torch.tensor([it["crop"] for it in items], dtype=torch.long),
    }
    if "json" in items[0]:
        batch["json"] = [it["json"] for it in items]
    return batch


class ImageShards:
    """WebDataset shards of images and captions (ours, or img2dataset's)."""

    Config = ImageShardsConfig

    def __init__(self, config: ImageShardsConfig | None = None):
        self.config = config or ImageShardsConfig()
        self._shards: list[str] | None = None

    def shards(self) -> list[str]:
        if self._shards is None:
            self._shards = expand_shards(self.config.urls, self.config.allow_pipe)
        return self._shards

    def check(self) -> None:
        self.shards()

    def loader(self, rank: int | None = None, world_size: int | None = None) -> StreamingLoader:
        return StreamingLoader(
            self.config, ImageDecoder(self.config), collate_images, rank, world_size, self.shards()
        )

    def batch_keys(self) -> frozenset[str]:
        keys = {"image", "caption", "key", "original_size", "crop_top_left", "epoch"}
        return frozenset(keys | ({"json"} if self.config.keep_json else set()))

    def scale_factor(self) -> float | None:
        return None

    def check_autoencoder(self, fingerprint: str) -> None:
        return None
