"""Per-sample transforms: crop + resize, caption choice. Randomness comes from a per-sample generator so
that a sample's augmentation does not depend on rank, worker or batch order."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF


def _center(rh: int, rw: int, resolution: int, rng: SampleRandom) -> tuple[int, int]:
    return (rh - resolution) // 2, (rw - resolution) // 2


def _random(rh: int, rw: int, resolution: int, rng: SampleRandom) -> tuple[int, int]:
    return rng.randint(0, rh - resolution), rng.randint(0, rw - resolution)


CROPS = {"center": _center, "random": _random}  # data.crop


class SampleRandom:
    """The few draws of :class:`random.Random` the transforms use (``random``, ``randrange``, ``randint``),
    from a BLAKE2b stream of a text: ~10x cheaper to create than a ``random.Random`` seeded with a string
    (SHA-512, then the Mersenne Twister's 624-word state), which was a fifth of the latent loader's time.
    Eight 64-bit draws per digest; ``randrange`` reduces one modulo ``n`` (bias below n / 2**64)."""

    __slots__ = ("_block", "_i", "_text", "_words")

    def __init__(self, text: str):
        self._text, self._block, self._i = text.encode(), 0, 0
        self._words = struct.unpack("<8Q", hashlib.blake2b(self._text).digest())

    def _next(self) -> int:
        if self._i == 8:
            self._block += 1
            self._i = 0
            salt = self._block.to_bytes(16, "little")
            self._words = struct.unpack("<8Q", hashlib.blake2b(self._text, salt=salt).digest())
        self._i += 1
        return self._words[self._i - 1]

    def random(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        return (self._next() >> 11) * (1.0 / (1 << 53))

    def randrange(self, n: int) -> int:
        if n <= 0:
            raise ValueError(f"empty range for randrange({n})")
        return self._next() % n

    def randint(self, a: int, b: int) -> int:
        return a + self.randrange(b - a + 1)


def sample_rng(seed: int, epoch: int, key: str) -> SampleRandom:
    """A generator for one sample in one epoch (same on every rank and worker count)."""
    return SampleRandom(f"{seed}:{epoch}:{key}")


@dataclass(frozen=True)
class CropWindow:
    """The square a crop keeps, in the decoded image's pixels, and its top-left corner in resized coordinates
    (SDXL's crop conditioning convention)."""

    top: int
    left: int
    side: int
    corner: tuple[int, int]


def crop_window(h: int, w: int, resolution: int, crop: str, rng: SampleRandom) -> CropWindow:
    """Where a square crop of an h x w image, resized to ``resolution``, comes from (one draw of ``rng`` for
    random crops)."""
    side = min(h, w)
    scale = resolution / side
    rh, rw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if crop not in CROPS:
        raise ValueError(f"data.crop must be one of {sorted(CROPS)}, got {crop!r}")
    top, left = CROPS[crop](rh, rw, resolution, rng)
    t0, l0 = min(round(top / scale), h - side), min(round(left / scale), w - side)
    return CropWindow(t0, l0, side, (top, left))


def apply_crop(
    pixels: torch.Tensor,
    window: CropWindow,
    resolution: int,
    mode: TF.InterpolationMode = TF.InterpolationMode.BICUBIC,
) -> torch.Tensor:
    """The window of a (C, H, W) tensor resized to ``resolution`` (bicubic antialiased; label maps: nearest)."""
    pixels = pixels[:, window.top : window.top + window.side, window.left : window.left + window.side]
    if window.side != resolution:
        antialias = mode != TF.InterpolationMode.NEAREST_EXACT
        pixels = TF.resize(pixels, [resolution, resolution], mode, antialias=antialias)
    return pixels


def crop_box(box: list[float], h: int, w: int, window: CropWindow, flip: bool) -> list[float]:
    """A normalised [x0, y0, x1, y1] box of an h x w image, normalised to the crop (clipped to it), mirrored
    when the crop is flipped."""
    x0, y0, x1, y1 = ((box[i] * (w if i % 2 == 0 else h)) for i in range(4))
    x0, x1 = ((x - window.left) / window.side for x in (x0, x1))
    y0, y1 = ((y - window.top) / window.side for y in (y0, y1))
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in (x0, y0, x1, y1))
    return [1.0 - x1, y0, 1.0 - x0, y1] if flip else [x0, y0, x1, y1]


def crop_resize(
    pixels: torch.Tensor, resolution: int, crop: str, rng: SampleRandom
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Square crop of a uint8 (3, H, W) image resized to ``resolution`` (bicubic, antialiased).

    Equivalent to resizing the shorter side to ``resolution`` and cropping, but only the kept region is
    resized. Returns the pixels and the crop's top-left corner in resized coordinates (SDXL's crop
    conditioning convention).
    """
    window = crop_window(pixels.shape[1], pixels.shape[2], resolution, crop, rng)
    return apply_crop(pixels, window, resolution), window.corner


def caption_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


CAPTION_CHOICES = {"first": lambda n, rng: 0, "random": lambda n, rng: rng.randrange(n) if n > 1 else 0}


def choose_caption(text: str, mode: str, rng: SampleRandom) -> tuple[int, str]:
    """Pick one caption when the text holds several (one per line): ``first`` or ``random``.
    Returns its index and text."""
    if mode not in CAPTION_CHOICES:
        raise ValueError(f"data.caption_choice must be one of {sorted(CAPTION_CHOICES)}, got {mode!r}")
    lines = caption_lines(text)
    if not lines:
        return 0, ""
    i = CAPTION_CHOICES[mode](len(lines), rng)
    return i, lines[i]
