"""Checks and decoding of one raw sample; shared by ``ldm-data validate`` and the streaming loader."""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from .errors import SampleError
from .tario import RawSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold

# PIL's process-wide decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is never changed here: everything
# else in the process that opens images keeps it. Our own limit is checked on the header, before decoding.
# Sample bytes are read-only; torch only reads them.
warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable")
# torchvision 0.29 deprecates its decoders in favour of TorchCodec; we pin 0.29 and use decode_jpeg because
# it is the fastest CPU JPEG path (bench/data_loader.py). It warns on every call otherwise.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class ImageLimits:
    """Sizes a sample's image must respect (0 disables a limit)."""

    min_size: int = 0  # shorter side, pixels
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = 0.0  # longer side / shorter side


def image_bytes(sample: RawSample) -> bytes:
    """The sample's image file, or SampleError(missing_image / zero_byte)."""
    for ext in IMAGE_EXTS:
        data = sample.files.get(ext)
        if data is not None:
            if len(data) == 0:
                raise SampleError("zero_byte", f"{sample.url}:{sample.key}.{ext} is empty")
            return data
    raise SampleError("missing_image", f"{sample.url}:{sample.key} has no image ({', '.join(IMAGE_EXTS)})")


def _open_header(data: bytes) -> Image.Image:
    """Parse, without decoding, an image's header.

    JPEG, PNG and WebP (known by their signature) are opened by their PIL plugin directly: ``Image.open``
    would also apply PIL's process-wide limit, where ours, checked next, is the one that must decide. Any
    other format goes through ``Image.open`` and keeps PIL's limit as well as ours.
    """
    fp = io.BytesIO(data)
    if data[:3] == b"\xff\xd8\xff":
        return JpegImagePlugin.JpegImageFile(fp)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return PngImagePlugin.PngImageFile(fp)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WebPImagePlugin.WebPImageFile(fp)
    return Image.open(fp)


def open_image(sample: RawSample, limits: ImageLimits) -> Image.Image:
    """Open (header only, not yet decoded) the sample's image and check its size against ``limits``."""
    data = image_bytes(sample)
    try:
        img = _open_header(data)
    except Image.DecompressionBombError as exc:  # a format we do not sniff, past PIL's own hard limit
        raise SampleError("too_many_pixels", f"{sample.url}:{sample.key}: {exc}") from None
    except Exception as exc:  # PIL raises many types for garbage input
        raise SampleError("undecodable_image", f"{sample.url}:{sample.key}: {exc}") from None
    check_size(sample, *img.size, limits)
    return img


def check_size(sample: RawSample, w: int, h: int, limits: ImageLimits) -> None:
    """SampleError(too_many_pixels / too_small / bad_aspect) when a w x h image breaks ``limits``."""
    if limits.max_pixels and w * h > limits.max_pixels:
        raise SampleError("too_many_pixels", f"{sample.url}:{sample.key} is {w}x{h}")
    if limits.min_size and min(w, h) < limits.min_size:
        raise SampleError("too_small", f"{sample.url}:{sample.key} is {w}x{h} < {limits.min_size}")
    if limits.max_aspect and max(w, h) > limits.max_aspect * min(w, h):
        raise SampleError("bad_aspect", f"{sample.url}:{sample.key} is {w}x{h}")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header without decoding; None if ``data`` is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            return (data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6]
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def draft_for(img: Image.Image, resolution: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers ``resolution`` (much faster)."""
    w, h = img.size
    scale = resolution / min(w, h)
    if img.format == "JPEG" and scale <= 0.5:
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))


def decode_rgb(
    sample: RawSample, limits: ImageLimits, target: int = 0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Check and decode the sample's image: uint8 (3, H, W) pixels and the stored (height, width).

    JPEGs are sized from their frame header and decoded by libjpeg-turbo straight into a tensor; when the
    image is at least twice ``target`` on its shorter side, PIL decodes it at a reduced DCT scale instead
    (the result is then smaller than the stored size, never smaller than ``target``). Other formats go
    through PIL.
    """
    data = image_bytes(sample)
    size = jpeg_size(data)
    if size is not None and not (target and min(size) >= 2 * target):
        check_size(sample, *size, limits)
        # imported here (once per process, then a dict lookup): importing torchvision costs a command that never
        # meets a JPEG (ldm-data synth / shuffle / validate, ldm-eval adherence) seconds (bench/startup.py)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise SampleError("undecodable_image", f"{sample.url}:{sample.key}: {exc}") from None
        return pixels, (size[1], size[0])
    img = open_image(sample, limits)
    w, h = img.size
    if target:
        draft_for(img, target)
    img = load_image(img, sample)
    return torch.from_numpy(np.asarray(img)).permute(2, 0, 1), (h, w)


def load_image(img: Image.Image, sample: RawSample) -> Image.Image:
    """Decode the pixels of an opened image as RGB; SampleError(undecodable_image) when they are corrupt."""
    try:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as exc:
        raise SampleError("undecodable_image", f"{sample.url}:{sample.key}: {exc}") from None


def caption_text(sample: RawSample, key: str = "txt") -> str:
    """The sample's caption text (possibly several lines, one caption each)."""
    data = sample.files.get(key)
    if data is None or not data.strip():
        raise SampleError("missing_caption", f"{sample.url}:{sample.key} has no .{key} caption")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SampleError("non_utf8_caption", f"{sample.url}:{sample.key}.{key} is not UTF-8") from None


def metadata(sample: RawSample, key: str = "json") -> dict:
    """The sample's JSON sidecar (img2dataset: url, status, width, height, ...); {} when absent or invalid."""
    data = sample.files.get(key)
    if not data:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
