"""Image shards as a data source (``data._target_: data_pipeline.images.ImageShards``): decode, check, crop,
flip and caption choice per sample, batched as uint8 channels-last tensors.

Labels beyond the caption come from the sample itself: ``fields`` are ``.json`` fields passed through as batch
keys (class ids, boxes), ``box_fields`` are the ones holding normalised ``[x0, y0, x1, y1]`` boxes (cropped and
flipped with the image), and ``maps`` are one-channel PNG members (segmentation maps, masks) cropped, flipped and
resized (nearest) with the image, each under the batch key of its name without ``.png``. ``dropped`` says which
samples had their conditions dropped (``caption_dropout``), so every condition encoder drops the same ones.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from .config import StreamConfig
from .errors import InputError, SampleError
from .loader import StreamingLoader
from .samples import DEFAULT_MAX_PIXELS, ImageLimits, caption_text, decode_rgb, metadata
from .tario import RawSample
from .transforms import CropWindow, apply_crop, choose_caption, crop_box, crop_window, sample_rng
from .urls import expand_shards

BASE_KEYS = frozenset(
    {"image", "caption", "key", "original_size", "crop_top_left", "epoch", "dropped", "json"}
)


@dataclass
class ImageShardsConfig(StreamConfig):
    _target_: str = "data_pipeline.images.ImageShards"
    crop: str = "center"  # center | random
    hflip: bool = False  # random horizontal flip (p=0.5)
    min_size: int = 0  # skip images whose shorter side is smaller (0: keep all)
    max_aspect: float = 0.0  # skip images more elongated than this (0: keep all)
    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_json: bool = False  # pass each sample's .json sidecar through (as a dict) in the batch
    fields: list[str] = field(default_factory=list)  # .json fields passed through as batch keys
    box_fields: list[str] = field(default_factory=list)  # of `fields`: lists of normalised boxes
    maps: list[str] = field(default_factory=list)  # one-channel PNG members (seg.png): batch key "seg"


def map_key(member: str) -> str:
    """The batch key of a label-map member: ``seg.png`` -> ``seg``."""
    return member.removesuffix(".png")


def check_labels(cfg: ImageShardsConfig) -> None:
    """Refuse label settings that cannot work, naming the key."""
    for name in cfg.fields:
        if name in BASE_KEYS:
            raise InputError(f"data.fields: {name!r} is a batch key of its own; pass another .json field")
    for name in cfg.box_fields:
        if name not in cfg.fields:
            raise InputError(f"data.box_fields: {name!r} is not in data.fields {list(cfg.fields)}")
    for member in cfg.maps:
        if not member.endswith(".png") or map_key(member) in BASE_KEYS | set(cfg.fields):
            raise InputError(f"data.maps: {member!r} must be a .png member whose name is no other batch key")


def decode_map(raw: RawSample, member: str, h: int, w: int) -> torch.Tensor:
    """A one-channel label map member as uint8 (1, h, w) (resized, nearest, when the image was decoded smaller)."""
    data = raw.files.get(member)
    if not data:
        raise SampleError("missing_label", f"{raw.url}:{raw.key} has no .{member}")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise SampleError("bad_label", f"{raw.url}:{raw.key}.{member}: {exc}") from None
    if img.mode not in ("L", "P"):
        raise SampleError("bad_label", f"{raw.url}:{raw.key}.{member} is {img.mode}, not a one-channel map")
    values = torch.from_numpy(np.array(img, dtype=np.uint8))[None]
    if values.shape[1:] != (h, w):
        values = TF.resize(values, [h, w], TF.InterpolationMode.NEAREST_EXACT, antialias=False)
    return values


class ImageDecoder:
    """Raw sample -> {pixels, caption, ...}: checks, decode, resize + crop, flip, caption choice and dropout,
    and the labels the config names (fields, boxes, maps) through the same crop and flip."""

    def __init__(self, cfg: ImageShardsConfig):
        self.cfg = cfg
        self.limits = ImageLimits(cfg.min_size, cfg.max_pixels, cfg.max_aspect)

    def __call__(self, raw: RawSample, epoch: int) -> dict:
        cfg = self.cfg
        rng = sample_rng(cfg.seed, epoch, raw.key)
        text = caption_text(raw, cfg.caption_key)
        pixels, size = decode_rgb(raw, self.limits, cfg.resolution)
        h, w = pixels.shape[1:]
        window = crop_window(h, w, cfg.resolution, cfg.crop, rng)
        pixels = apply_crop(pixels, window, cfg.resolution)
        flip = cfg.hflip and rng.random() < 0.5
        if flip:
            pixels = pixels.flip(-1)
        _, caption = choose_caption(text, cfg.caption_choice, rng)
        dropped = cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout
        item = {"pixels": pixels, "caption": "" if dropped else caption, "key": raw.key, "size": size,
                "crop": window.corner, "dropped": dropped}  # fmt: skip
        if cfg.keep_json or cfg.fields:
            meta = metadata(raw)
            if cfg.keep_json:
                item["json"] = meta
            item["fields"] = self.fields(raw, meta, h, w, window, flip)
        if cfg.maps:
            item["maps"] = {
                map_key(m): self.label_map(decode_map(raw, m, h, w), window, flip) for m in cfg.maps
            }
        return item

    def fields(self, raw: RawSample, meta: dict, h: int, w: int, window: CropWindow, flip: bool) -> dict:
        out = {}
        for name in self.cfg.fields:
            if name not in meta:
                raise SampleError("missing_label", f"{raw.url}:{raw.key}.json has no field {name!r}")
            out[name] = meta[name]
        for name in self.cfg.box_fields:
            try:
                out[name] = [crop_box([float(v) for v in b], h, w, window, flip) for b in out[name]]
            except (TypeError, ValueError, IndexError):
                raise SampleError(
                    "bad_label", f"{raw.url}:{raw.key}.json {name!r} is not a box list"
                ) from None
        return out

    def label_map(self, values: torch.Tensor, window: CropWindow, flip: bool) -> torch.Tensor:
        values = apply_crop(values, window, self.cfg.resolution, TF.InterpolationMode.NEAREST_EXACT)
        return values.flip(-1) if flip else values


def collate_field(values: list):
    """Numbers become a tensor (int64 for integers, else float32); anything else stays a list."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.long)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.float32)
    return list(values)


def collate_images(items: list[dict]) -> dict:
    """Stack decoded samples: ``image`` is uint8 (B, 3, H, W) in channels-last memory layout.

    Decoders produce HWC buffers (seen as CHW views), so stacking the HWC views is a plain copy."""
    batch = {
        "image": torch.stack([it["pixels"].permute(1, 2, 0) for it in items]).permute(0, 3, 1, 2),
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "original_size": torch.tensor([it["size"] for it in items], dtype=torch.long),
        "crop_top_left": torch.tensor([it["crop"] for it in items], dtype=torch.long),
        "dropped": torch.tensor([it["dropped"] for it in items], dtype=torch.bool),
    }
    if "json" in items[0]:
        batch["json"] = [it["json"] for it in items]
    for name in items[0].get("fields", {}):
        batch[name] = collate_field([it["fields"][name] for it in items])
    for name in items[0].get("maps", {}):
        batch[name] = torch.stack([it["maps"][name] for it in items])
    return batch


class ImageShards:
    """WebDataset shards of images and captions (ours, or img2dataset's)."""

    Config = ImageShardsConfig

    def __init__(self, config: ImageShardsConfig | None = None):
        self.config = config or ImageShardsConfig()
        check_labels(self.config)
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
        cfg = self.config
        keys = {"image", "caption", "key", "original_size", "crop_top_left", "epoch", "dropped"}
        keys |= set(cfg.fields) | {map_key(m) for m in cfg.maps}
        return frozenset(keys | ({"json"} if cfg.keep_json else set()))

    def scale_factor(self) -> float | None:
        return None

    def check_autoencoder(self, fingerprint: str) -> None:
        return None
