"""The data config schema (a Hydra structured config: unknown keys and wrong types fail at start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .samples import DEFAULT_MAX_PIXELS


@dataclass
class DataConfig:
    """Where samples come from and how they are streamed to one rank."""

    kind: str = "images"  # images | latents
    urls: Any = field(default_factory=list)  # list of paths / brace patterns / folders, or one such string
    allow_pipe: bool = False  # permit pipe:CMD shard URLs (they run shell commands)
    resolution: int = 256
    crop: str = "center"  # center | random
    hflip: bool = False  # random horizontal flip (p=0.5)
    caption_key: str = "txt"
    caption_choice: str = "random"  # several captions (one per line): random | first
    caption_dropout: float = 0.0  # probability of an empty caption (classifier-free guidance)
    min_size: int = 0  # skip images whose shorter side is smaller (0: keep all)
    max_aspect: float = 0.0  # skip images more elongated than this (0: keep all)
    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_json: bool = False  # pass each sample's .json sidecar through (as a dict) in the batch
    batch_size: int = 8  # per rank
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = True  # only used when CUDA is present
    persistent_workers: bool = True
    shuffle_buffer: int = 1000  # samples mixed together; 1 disables shuffling
    shard_shuffle: bool = True
    resampled: bool = False  # draw shards with replacement (any number of shards per rank)
    epoch_samples: int = 0  # resampled mode: nominal samples per epoch (WebDataset's with_epoch)
    seed: int = 0
    max_bad_fraction: float = 0.05  # abort when more samples than this fraction are bad...
    bad_fraction_min_samples: int = 200  # ...once a worker has seen at least this many
    # latents (data.kind=latents): which stored orientation to use and the autoencoder they must match
    latent_flip: bool = False  # use the stored horizontally flipped latents with p=0.5 (when stored)
    expect_autoencoder: str = ""  # refuse latent shards whose manifest names another autoencoder
    expect_scale_factor: float = (
        0.0  # refuse latent shards with another scale factor (0: take the manifest's)
    )
