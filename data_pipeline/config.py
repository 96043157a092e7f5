"""What every shard source shares: where the shards are and how they are streamed to one rank. Each source
(``images.ImageShards``, ``latents.LatentShards``) extends it with its own fields; all are Hydra structured
configs, so unknown keys and wrong types fail at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StreamConfig:
    _target_: str = ""
    urls: Any = field(default_factory=list)  # list of paths / brace patterns / folders, or one such string
    allow_pipe: bool = False  # permit pipe:CMD shard URLs (they run shell commands)
    resolution: int = 256
    caption_key: str = "txt"
    caption_choice: str = "random"  # several captions (one per line): random | first
    caption_dropout: float = 0.0  # probability of an empty caption (classifier-free guidance)
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
