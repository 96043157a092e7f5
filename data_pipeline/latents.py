"""Latent shards: the format ``ldm-precompute`` writes and the trainer reads, writer and reader side by side.

A sample holds ``{key}.latents.safetensors`` (posterior ``mean`` and ``std`` in fp16/bf16, ``mean_flip`` /
``std_flip`` for the horizontally flipped image when stored, and ``text`` tokens per caption line when stored),
``{key}.txt`` (the captions) and ``{key}.json`` (original size, crop, source). Safetensors keeps bf16 and loads
without running code. Beside the shards:

    _manifest/<shard>.json   one record per finished shard: count, skips, sha256 and the settings it was made with
    _manifest/scale.json     the latent scale factor measured before encoding
    manifest.json            FORMAT, settings, scale factor, every shard's record and the totals
    null_text.safetensors    the text encoder's tokens for the empty caption (when text tokens are stored)

The reader checks ``format`` (an unknown or missing version is an error naming the file) and the settings
against the training config.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .atomic import atomic_json, atomic_write
from .config import StreamConfig
from .errors import InputError, RemoteShardError, SampleError
from .loader import StreamingLoader
from .rawtensors import Layouts, stack, tensor_bytes
from .remote import read_bytes
from .samples import caption_text, metadata
from .shards import AtomicShardWriter
from .tario import RawSample
from .transforms import choose_caption, sample_rng
from .urls import ShardUrl, beside, expand_shards

FORMAT = "ldm-latents/2"
LATENT_EXT = "latents.safetensors"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # the manifest's settings["dtype"]
MANIFEST = "manifest.json"
RECORDS = "_manifest"
NULL_TEXT = "null_text.safetensors"


class LatentFormatError(InputError):
    """Latent shards that cannot be read as this version's format, or that do not match the config."""


# -- one sample ------------------------------------------------------------------------------------------------
def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_tensors({k: v.contiguous() for k, v in tensors.items()})


# -- writing ---------------------------------------------------------------------------------------------------
class LatentShardWriter:
    """One output shard (same name and keys as its input shard), written atomically; :meth:`close` records it."""

    def __init__(self, out: Path, name: str, settings: dict):
        self.out, self.name, self.settings = Path(out), name, settings
        self.writer = AtomicShardWriter(self.out / name)

    def write(self, key: str, tensors: dict[str, torch.Tensor], text: str, meta: dict) -> None:
        self.writer.write({"__key__": key, LATENT_EXT: pack(tensors), "txt": text, "json": meta})

    def close(self, skipped: dict[str, int]) -> dict:
        """Finish the shard, then write its record (the record's presence means the shard is complete)."""
        self.writer.close()
        record = {
            "shard": self.name,
            "count": self.writer.count,
            "skipped": dict(skipped),
            "sha256": sha256_file(self.out / self.name),
            "settings": self.settings,
        }
        atomic_json(self.out / RECORDS / f"{self.name}.json", record)
        return record

    def abort(self) -> None:
        self.writer.abort()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_record(out: Path, name: str, settings: dict) -> dict | None:
    """The record of a finished output shard made with ``settings``, or None (not done, or made otherwise)."""
    path = Path(out) / RECORDS / f"{name}.json"
    if not path.is_file() or not (Path(out) / name).is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("settings") == settings else None


def write_null_text(out: Path, tokens: torch.Tensor) -> None:
    atomic_write(Path(out) / NULL_TEXT, pack({"text": tokens.contiguous()}))


def write_manifest(out: Path, names: list[str], settings: dict, scale_factor: float, extra: dict) -> dict:
    """``manifest.json`` over the records of ``names`` (all must be finished with ``settings``, which the
    manifest holds once: its per-shard records are ``_manifest/<shard>.json`` without their settings)."""
    records = []
    for name in names:
        record = shard_record(out, name, settings)
        if record is None:
            raise LatentFormatError(f"{Path(out) / RECORDS / (name + '.json')}: shard {name} is not finished")
        # every record's settings equal the manifest's (checked just above): not repeated 100,000 times, which
        # was 4/5 of a big manifest's bytes, and so of each rank's start-up parse
        records.append({k: v for k, v in record.items() if k != "settings"})
    skipped: dict[str, int] = {}
    for r in records:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    manifest = {
        "format": FORMAT,
        "settings": settings,
        "scale_factor": scale_factor,
        **extra,
        "shards": records,
        "samples": sum(r["count"] for r in records),
        "skipped": skipped,
    }
    atomic_json(Path(out) / MANIFEST, manifest)
    return manifest


# -- reading ---------------------------------------------------------------------------------------------------
def _read(url: str) -> bytes | None:
    """A file beside the shards (local or remote), or None when it is not there."""
    try:
        return read_bytes(url)
    except (FileNotFoundError, IsADirectoryError):
        return None
    except RemoteShardError as exc:
        if exc.missing:
            return None
        raise LatentFormatError(f"cannot read {url}: {exc}") from None


_SPACE = re.compile(r"[ \t\n\r]*")
HEAD = frozenset({"format", "settings", "scale_factor"})  # what a reader needs; the shard records are not


def _members(text: str, needed: frozenset[str] | None) -> dict:
    """The members of the JSON object ``text``, parsed in order, stopping once all of ``needed`` are found
    (None: all). A reader needs the first few, not 100,000 shard records (~0.5 s per rank to parse)."""
    decode = json.JSONDecoder().raw_decode
    out: dict = {}

    def skip(i: int, expected: str) -> int:
        i = _SPACE.match(text, i).end()
        if text[i : i + 1] != expected:
            raise ValueError(f"expected {expected!r} at character {i}")
        return _SPACE.match(text, i + 1).end()

    i = skip(0, "{")
    if text[i : i + 1] == "}":
        return out
    while True:
        key, i = decode(text, i)
        if not isinstance(key, str):
            raise ValueError(f"an object key that is not a string before character {i}")
        value, i = decode(text, skip(i, ":"))
        out[key] = value
        if needed is not None and needed <= out.keys():
            return out
        i = _SPACE.match(text, i).end()
        if text[i : i + 1] == "}":
            return out
        i = skip(i, ",")


def read_manifest(where: str | Path, needed: frozenset[str] | None = None) -> dict:
    """The manifest of latent shards, after checking its format version. ``where`` is a local folder, or the
    manifest's own URL (a :class:`~.urls.ShardUrl`, e.g. beside remote shards). With ``needed`` (e.g.
    :data:`HEAD`), parsing stops once those members are read."""
    path = where if isinstance(where, ShardUrl) else ShardUrl(str(Path(where) / MANIFEST))
    data = _read(path)
    if data is None:
        folder = path[: -len(MANIFEST) - 1] if path.endswith(MANIFEST) else path
        raise LatentFormatError(f"no {MANIFEST} in {folder}: these are not ldm-precompute latent shards")
    try:
        manifest = _members(data.decode("utf-8"), needed)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LatentFormatError(f"{path} is not valid JSON: {exc}") from None
    version = manifest.get("format")
    if version != FORMAT:
        raise LatentFormatError(
            f"{path}: latent-shard format {version!r} is not {FORMAT!r} (this version's); re-run ldm-precompute"
        )
    return manifest


@dataclass
class LatentShardsConfig(StreamConfig):
    _target_: str = "data_pipeline.latents.LatentShards"
    latent_flip: bool = False  # use the stored horizontally flipped latents with p=0.5 (when stored)
    expect_autoencoder: str = ""  # refuse latent shards whose manifest names another autoencoder
    expect_scale_factor: float = (
        0.0  # refuse latent shards with another scale factor (0: take the manifest's)
    )


class LatentDecoder:
    """Raw latent sample -> {mean, std, caption, [text tokens]}: flip choice, caption choice and dropout,
    seeded per sample like the image decoder (same draws in the same order when flips are off).

    The tensors stay byte ranges of the sample until :meth:`collate` copies a batch's into one tensor each
    (see :mod:`.rawtensors`). Every sample's mean and std must have the dtype and shape of ``latent``
    (``(dtype, shape)`` from the manifest; the first sample's when None) and, with ``null_text``, a text-token
    row of its shape: anything else is a ``bad_latent`` sample, never a batch that cannot be stacked."""

    def __init__(
        self,
        cfg: LatentShardsConfig,
        null_text: torch.Tensor | None = None,
        latent: tuple[torch.dtype, tuple[int, ...]] | None = None,
    ):
        self.cfg, self.null_text, self.latent = cfg, null_text, latent
        self.text = None if null_text is None else (null_text.dtype, tuple(null_text.shape))
        self._null = None if null_text is None else tensor_bytes(null_text)
        self.layouts = Layouts()

    def _bad(self, raw: RawSample, detail: str) -> SampleError:
        return SampleError("bad_latent", f"{raw.url}:{raw.key}.{LATENT_EXT}: {detail}")

    def __call__(self, raw: RawSample, epoch: int) -> dict:
        cfg = self.cfg
        data = raw.files.get(LATENT_EXT)
        if not data:
            raise SampleError("bad_latent", f"{raw.url}:{raw.key} has no .{LATENT_EXT}")
        try:
            layout = self.layouts.parse(data)
        except ValueError as exc:
            raise self._bad(raw, str(exc)) from None
        rng = sample_rng(cfg.seed, epoch, raw.key)
        text = caption_text(raw, cfg.caption_key)
        flip = cfg.latent_flip and "mean_flip" in layout and rng.random() < 0.5
        mean, std = (
            (layout.get("mean_flip"), layout.get("std_flip"))
            if flip
            else (layout.get("mean"), layout.get("std"))
        )
        if mean is None or std is None:
            raise self._bad(raw, f"no mean/std among {sorted(layout)}")
        self.latent = self.latent or (mean.dtype, mean.shape)
        if (mean.dtype, mean.shape) != self.latent or (std.dtype, std.shape) != self.latent:
            raise self._bad(
                raw,
                f"mean/std are {mean.dtype}{list(mean.shape)}, expected {self.latent[0]}{list(self.latent[1])}",
            )
        index, caption = choose_caption(text, cfg.caption_choice, rng)
        dropped = cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout
        view = memoryview(data)
        meta = metadata(raw)
        item = {"mean": view[mean.start : mean.end], "std": view[std.start : std.end],
                "caption": "" if dropped else caption, "key": raw.key, "dropped": dropped,
                "size": tuple(meta.get("original_size", (0, 0))), "crop": tuple(meta.get("crop_top_left", (0, 0)))}  # fmt: skip
        if self.text is not None:
            tokens = layout.get("text")
            if tokens is None or (tokens.dtype, tokens.shape[1:]) != self.text or index >= tokens.shape[0]:
                got = "none" if tokens is None else f"{tokens.dtype}{list(tokens.shape)}"
                raise self._bad(
                    raw,
                    f"text tokens {got}, expected a row of {self.text[0]}{list(self.text[1])} per caption",
                )
            row = (tokens.end - tokens.start) // tokens.shape[0]
            at = tokens.start + index * row
            item["text"] = self._null if dropped else view[at : at + row]
        return item

    def collate(self, items: list[dict]) -> dict:
        """Stack decoded samples: ``latent_mean`` / ``latent_std`` ``(B, *latent_shape)``, ``text_tokens``, ``dropped``."""
        dtype, shape = self.latent
        batch = {
            "latent_mean": stack([it["mean"] for it in items], dtype, shape),
            "latent_std": stack([it["std"] for it in items], dtype, shape),
            "caption": [it["caption"] for it in items],
            "key": [it["key"] for it in items],
            "original_size": torch.tensor([it["size"] for it in items], dtype=torch.long),
            "crop_top_left": torch.tensor([it["crop"] for it in items], dtype=torch.long),
            "dropped": torch.tensor([it["dropped"] for it in items], dtype=torch.bool),
        }
        if self.text is not None:
            batch["text_tokens"] = stack([it["text"] for it in items], *self.text)
        return batch


class LatentShards:
    """Latent shards made by ``ldm-precompute`` (``data._target_: data_pipeline.latents.LatentShards``)."""

    Config = LatentShardsConfig

    def __init__(self, config: LatentShardsConfig | None = None):
        self.config = config or LatentShardsConfig()
        self._shards: list[str] | None = None
        self._manifest: dict | None = None

    def shards(self) -> list[str]:
        if self._shards is None:
            self._shards = expand_shards(self.config.urls, self.config.allow_pipe)
        return self._shards

    def check(self) -> None:
        self.manifest  # noqa: B018  (reads and checks it)

    @property
    def folder(self) -> str:
        """Where the (first) shards are: a local folder or a remote URL's folder."""
        return beside(self.shards()[0], MANIFEST)[: -len(MANIFEST) - 1]

    @property
    def manifest(self) -> dict:
        """The checked manifest beside the (first) shards."""
        if self._manifest is None:
            where = beside(self.shards()[0], MANIFEST)
            cfg, manifest = self.config, read_manifest(where, HEAD)
            resolution = manifest["settings"]["resolution"]
            if resolution != cfg.resolution:
                raise LatentFormatError(
                    f"{where}: encoded at resolution {resolution} but data.resolution is {cfg.resolution}"
                )
            if cfg.expect_scale_factor and abs(manifest["scale_factor"] - cfg.expect_scale_factor) > 1e-6:
                raise LatentFormatError(
                    f"{where}: scale factor {manifest['scale_factor']} but data.expect_scale_factor is "
                    f"{cfg.expect_scale_factor}"
                )
            self._manifest = manifest
            if cfg.expect_autoencoder:
                self.check_autoencoder(cfg.expect_autoencoder)
        return self._manifest

    def check_autoencoder(self, fingerprint: str) -> None:
        made_with = self.manifest["settings"]["autoencoder"]
        if made_with != fingerprint:
            raise LatentFormatError(
                f"latent shards in {self.folder} were made with autoencoder {made_with}, this run's is "
                f"{fingerprint}: re-run ldm-precompute with this autoencoder"
            )

    def scale_factor(self) -> float | None:
        return float(self.manifest["scale_factor"])

    def batch_keys(self) -> frozenset[str]:
        keys = {
            "latent_mean",
            "latent_std",
            "caption",
            "key",
            "original_size",
            "crop_top_left",
            "epoch",
            "dropped",
        }
        return frozenset(keys | ({"text_tokens"} if self.manifest["settings"]["text_tokens"] else set()))

    def loader(self, rank: int | None = None, world_size: int | None = None) -> StreamingLoader:
        manifest = self.manifest
        null_text = None
        if manifest["settings"]["text_tokens"]:
            where = beside(self.shards()[0], NULL_TEXT)
            data = _read(where)
            if data is None:
                raise LatentFormatError(f"{where} is missing: the manifest says text tokens are stored")
            null_text = load_tensors(data)["text"]
        settings = manifest["settings"]
        latent = (DTYPES[settings["dtype"]], tuple(settings["latent_shape"]))
        decode = LatentDecoder(self.config, null_text, latent)
        return StreamingLoader(self.config, decode, decode.collate, rank, world_size, self.shards())
