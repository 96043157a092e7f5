"""Prompt adherence on the synthetic captioned-shapes set, scored by rules (no learned network).

The shapes are saturated colours on low-chroma backgrounds, so the object is the set of pixels whose chroma
(max - min over RGB) is high. Its centroid gives the position (quadrant), its median colour the nearest
palette colour by hue, and its mask, normalised to its bounding box, the shape whose template it overlaps most.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.synthetic import COLOURS, POSITIONS, SHAPES, shape_polygon

CHROMA_MIN = 70  # palette colours have chroma >= ~130, backgrounds <= ~45
TEMPLATE = 24
_PROMPT = re.compile(r"a (\w+) (\w+) in the (\w+ \w+)")


@dataclass(frozen=True)
class Reading:
    colour: str
    shape: str
    position: str
    pixels: int  # size of the object found (0: nothing found)


def _templates() -> dict[str, np.ndarray]:
    out = {}
    for shape in SHAPES:
        big = TEMPLATE * 4
        img = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(img)
        c, r = big / 2, big / 2
        poly = shape_polygon(shape, c, c, r)
        if poly is None:
            draw.ellipse([0, 0, big - 1, big - 1], fill=255)
        else:
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            sx, sy = (big - 1) / (max(xs) - min(xs)), (big - 1) / (max(ys) - min(ys))
            draw.polygon([((x - min(xs)) * sx, (y - min(ys)) * sy) for x, y in poly], fill=255)
        out[shape] = np.asarray(img.resize((TEMPLATE, TEMPLATE), Image.BOX), dtype=np.float32) / 255
    return out


TEMPLATES = _templates()
_HUES = {name: colorsys.rgb_to_hsv(*(np.array(rgb) / 255))[0] for name, rgb in COLOURS.items()}


def nearest_colour(rgb: np.ndarray) -> str:
    h = colorsys.rgb_to_hsv(*(rgb / 255))[0]
    return min(_HUES, key=lambda n: min(abs(h - _HUES[n]), 1 - abs(h - _HUES[n])))


def read_image(image: np.ndarray) -> Reading:
    """Colour, shape and position of the object in an HxWx3 uint8 image."""
    img = image.astype(np.int16)
    chroma = img.max(axis=2) - img.min(axis=2)
    mask = chroma > CHROMA_MIN
    n = int(mask.sum())
    h, w = mask.shape
    if n < max(4, h * w // 400):
        return Reading("none", "none", "none", n)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    position = f"{'top' if cy < h / 2 else 'bottom'} {'left' if cx < w / 2 else 'right'}"
    colour = nearest_colour(np.median(image[mask].astype(np.float32), axis=0))
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32) * 255
    norm = (
        np.asarray(
            Image.fromarray(crop.astype(np.uint8)).resize((TEMPLATE, TEMPLATE), Image.BILINEAR),
            dtype=np.float32,
        )
        / 255
    )

    def iou(t: np.ndarray) -> float:
        return float(np.minimum(norm, t).sum() / max(np.maximum(norm, t).sum(), 1e-6))

    shape = max(TEMPLATES, key=lambda s: iou(TEMPLATES[s]))
    return Reading(colour, shape, position, n)


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """("red", "circle", "top left") from "a red circle in the top left"."""
    m = _PROMPT.fullmatch(prompt.strip())
    if not m or m.group(1) not in COLOURS or m.group(2) not in SHAPES or m.group(3) not in POSITIONS:
        raise ValueError(f"not a synthetic-set prompt: {prompt!r}")
    return m.group(1), m.group(2), m.group(3)


def score(images: list[np.ndarray], prompts: list[str]) -> dict:
    """Accuracy of colour, shape, position and all three, over images generated for ``prompts``."""
    hits = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    per_prompt: dict[str, list[int]] = {}
    for img, prompt in zip(images, prompts, strict=True):
        want = parse_prompt(prompt)
        got = read_image(img)
        ok = [got.colour == want[0], got.shape == want[1], got.position == want[2]]
        for key, v in zip(("colour", "shape", "position"), ok, strict=True):
            hits[key] += v
        hits["all"] += all(ok)
        per_prompt.setdefault(prompt, []).append(int(all(ok)))
    n = max(len(images), 1)
    return {
        "n": len(images),
        **{k: v / n for k, v in hits.items()},
        "per_prompt": {p: sum(v) / len(v) for p, v in per_prompt.items()},
    }
