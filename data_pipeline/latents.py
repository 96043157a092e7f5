"""Latent shards: what ``ldm-precompute`` writes and the loader reads with ``data.kind=latents``.

A sample holds ``{key}.latents.safetensors`` (posterior ``mean`` and ``std`` in fp16/bf16, and ``mean_flip`` /
``std_flip`` for the horizontally flipped image when stored, and ``text`` tokens per caption line when stored),
``{key}.txt`` (the captions) and ``{key}.json`` (original size, crop, source). Safetensors keeps bf16 and loads
without running code. ``manifest.json`` beside the shards records the autoencoder, the latent scale factor and
per-shard counts and checksums; the trainer checks it against its own config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .config import DataConfig
from .errors import SampleError
from .loader import StreamingLoader
from .samples import caption_text, metadata
from .tario import RawSample
from .transforms import choose_caption, sample_rng
from .urls import expand_shards

LATENT_EXT = "latents.safetensors"
MANIFEST = "manifest.json"
NULL_TEXT = "null_text.safetensors"


def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_tensors({k: v.contiguous() for k, v in tensors.items()})


def unpack(sample: RawSample) -> dict[str, torch.Tensor]:
    data = sample.files.get(LATENT_EXT)
    if not data:
        raise SampleError("bad_latent", f"{sample.url}:{sample.key} has no .{LATENT_EXT}")
    try:
        return load_tensors(data)
    except Exception as exc:
        raise SampleError("bad_latent", f"{sample.url}:{sample.key}: {exc}") from None


class LatentDecoder:
    """Raw latent sample -> {mean, std, caption, [text tokens]}: flip choice, caption choice and dropout,
    seeded per sample like the image decoder (same draws in the same order when flips are off)."""

    def __init__(self, cfg: DataConfig, null_text: torch.Tensor | None = None):
        self.cfg, self.null_text = cfg, null_text

    def __call__(self, raw: RawSample, epoch: int) -> dict:
        cfg = self.cfg
        rng = sample_rng(cfg.seed, epoch, raw.key)
        t = unpack(raw)
        text = caption_text(raw, cfg.caption_key)
        flip = cfg.latent_flip and "mean_flip" in t and rng.random() < 0.5
        mean, std = (t["mean_flip"], t["std_flip"]) if flip else (t["mean"], t["std"])
        index, caption = choose_caption(text, cfg.caption_choice, rng)
        dropped = cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout
        item = {"mean": mean, "std": std, "caption": "" if dropped else caption, "key": raw.key}
        meta = metadata(raw)
        item["size"] = tuple(meta.get("original_size", (0, 0)))
        item["crop"] = tuple(meta.get("crop_top_left", (0, 0)))
        if "text" in t:
            if dropped and self.null_text is None:
                raise SampleError(
                    "bad_latent", f"{raw.url}: text tokens stored but no {NULL_TEXT} beside the shards"
                )
            item["text"] = self.null_text if dropped else t["text"][index]
        return item


def collate_latents(items: list[dict]) -> dict:
    batch = {
        "latent_mean": torch.stack([it["mean"] for it in items]),
        "latent_std": torch.stack([it["std"] for it in items]),
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "original_size": torch.tensor([it["size"] for it in items], dtype=torch.long),
        "crop_top_left": torch.tensor([it["crop"] for it in items], dtype=torch.long),
    }
    if "text" in items[0]:
        batch["text_tokens"] = torch.stack([it["text"] for it in items])
    return batch


def read_manifest(shards: list[str]) -> tuple[dict, Path]:
    """The manifest beside the (first) latent shards."""
    folder = Path(shards[0]).parent
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"data.urls: no {MANIFEST} beside {shards[0]}: these are not ldm-precompute shards"
        )
    return json.loads(path.read_text()), folder


def latent_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None) -> StreamingLoader:
    """The streaming loader over latent shards, after checking their manifest against the config."""
    shards = expand_shards(cfg.urls, cfg.allow_pipe)
    manifest, folder = read_manifest(shards)
    if cfg.expect_autoencoder and manifest["autoencoder"]["id"] != cfg.expect_autoencoder:
        raise ValueError(
            f"latent shards in {folder} were made with autoencoder {manifest['autoencoder']['id']} "
            f"but data.expect_autoencoder is {cfg.expect_autoencoder}: re-run ldm-precompute"
        )
    if manifest["resolution"] != cfg.resolution:
        raise ValueError(
            f"latent shards in {folder} were encoded at resolution {manifest['resolution']} but "
            f"data.resolution is {cfg.resolution}"
        )
    if cfg.expect_scale_factor and abs(manifest["scale_factor"] - cfg.expect_scale_factor) > 1e-6:
        raise ValueError(
            f"latent shards in {folder} have scale factor {manifest['scale_factor']} but "
            f"data.expect_scale_factor is {cfg.expect_scale_factor}"
        )
    null_text = None
    if (folder / NULL_TEXT).is_file():
        null_text = load_tensors((folder / NULL_TEXT).read_bytes())["text"]
    loader = StreamingLoader(
        cfg, rank, world_size, decode=LatentDecoder(cfg, null_text), collate=collate_latents
    )
    loader.manifest = manifest
    return loader
