"""A deterministic captioned data set of coloured shapes ("a red circle in the top left").

6 colours x 4 shapes x 4 positions = 96 caption combinations, on varied low-saturation backgrounds (grey
level, tint, gradient, noise). Twelve combinations are held out of the ``train`` split (each colour twice,
each shape and each position three times, so every attribute is still seen in training) and make up the
``heldout`` split: prompts a model has never seen as a whole. Each sample's ground truth goes in its
``.json`` sidecar so generated images can be scored against it.

With ``labels`` (``ldm-data synth --labels``) each sample also carries what the other conditioning modes train
on, all exact (computed from the drawn geometry, never estimated): in the ``.json``, ``class_id`` (colour x
shape, 0-23), ``colour_id``, ``shape_id``, ``boxes`` (one normalised ``[x0, y0, x1, y1]`` per object: the bounds
of the shape as drawn, to a quarter pixel) and ``box_labels`` (their class ids); ``mask.png`` (255 where the shape covers at least
half a pixel) and ``seg.png`` (the segmentation map: ``class_id + 1`` on the shape, 0 on the background). The
low-resolution image of super-resolution is the image itself, downsampled in the task. Without ``labels`` the
shards are byte-identical to those of earlier versions.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .shards import AtomicShardWriter, _run_jobs, shard_name

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 36, 36),
    "yellow": (236, 206, 28),
    "green": (36, 168, 60),
    "cyan": (28, 190, 204),
    "blue": (40, 72, 222),
    "purple": (152, 48, 212),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SPLITS = ("train", "heldout", "all")
SUPERSAMPLE = 4
NUM_CLASSES = len(COLOURS) * len(SHAPES)  # class_id = colour index * len(SHAPES) + shape index


def class_id(colour: str, shape: str) -> int:
    """The class label of a (colour, shape) pair: 0 .. NUM_CLASSES - 1."""
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def class_name(label: int) -> str:
    """``"red circle"`` for the class id of a red circle."""
    return f"{list(COLOURS)[label // len(SHAPES)]} {SHAPES[label % len(SHAPES)]}"


def is_held_out(colour: str, shape: str, position: str) -> bool:
    """Whether a caption combination is kept out of the training split."""
    c, s, p = list(COLOURS).index(colour), SHAPES.index(shape), POSITIONS.index(position)
    return (s, p) in {(c % 4, (c + 1) % 4), ((c + 2) % 4, (c + 3) % 4)}


def combinations(split: str) -> list[tuple[str, str, str]]:
    """The (colour, shape, position) combinations of a split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    every = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    if split == "all":
        return every
    return [t for t in every if is_held_out(*t) == (split == "heldout")]


def caption_for(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} in the {position}"


def _square(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    k = r * 0.9
    return [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]


def _triangle(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    a = r * 0.36
    return [
        (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a), (cx + a, cy + a),
        (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
    ]  # fmt: skip


OUTLINES = {"circle": None, "square": _square, "triangle": _triangle, "cross": _cross}  # None: an ellipse


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Outline of a shape of half-size ``r`` centred at (cx, cy); None for the circle (drawn as ellipse)."""
    if shape not in OUTLINES:
        raise ValueError(f"unknown shape {shape!r}")
    outline = OUTLINES[shape]
    return outline(cx, cy, r) if outline is not None else None


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(35, 220)
    tint = rng.uniform(-12, 12, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0, 28)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1) - 0.5
    grad = amp * (np.cos(angle) * xx + np.sin(angle) * yy)
    noise = rng.normal(0, rng.uniform(0, 5), size=(size, size, 3))
    bg = grey + tint[None, None, :] + grad[..., None] + noise
    return np.clip(bg, 0, 255)


def render(
    colour: str, shape: str, position: str, size: int, rng: np.random.Generator
) -> tuple[Image.Image, dict]:
    """Draw one sample; returns the image and its ground truth."""
    img, truth, _, _ = render_with_coverage(colour, shape, position, size, rng)
    return img, truth


def render_with_coverage(
    colour: str, shape: str, position: str, size: int, rng: np.random.Generator
) -> tuple[Image.Image, dict, np.ndarray, list[float]]:
    """:func:`render`, also returning the shape's pixel coverage (H, W) in [0, 1] and its drawn extent
    ``[x0, y0, x1, y1]`` in pixels (the bounds of the supersampled mask: what the image shows, to 1/4 px)."""
    half = size / 2
    r = rng.uniform(0.28, 0.42) * half  # half-size of the shape
    margin = r + 0.04 * half
    row, col = position.split()
    cx = rng.uniform(margin, half - margin) + (half if col == "right" else 0)
    cy = rng.uniform(margin, half - margin) + (half if row == "bottom" else 0)
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    k = SUPERSAMPLE
    poly = shape_polygon(shape, cx * k, cy * k, r * k)
    if poly is None:
        draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=255)
    else:
        draw.polygon(poly, fill=255)
    ys, xs = np.nonzero(np.asarray(mask))
    extent = [xs.min() / k, ys.min() / k, (xs.max() + 1) / k, (ys.max() + 1) / k]
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255.0
    fg = np.clip(np.array(COLOURS[colour], dtype=np.float32) + rng.uniform(-14, 14, size=3), 0, 255)
    bg = _background(size, rng)
    pixels = (alpha * fg + (1 - alpha) * bg).round().astype(np.uint8)
    truth = {
        "colour": colour,
        "shape": shape,
        "position": position,
        "caption": caption_for(colour, shape, position),
        "center": [round(cx, 2), round(cy, 2)],
        "radius": round(r, 2),
        "held_out": is_held_out(colour, shape, position),
    }
    return Image.fromarray(pixels), truth, alpha[..., 0], extent


def labels_for(
    truth: dict, coverage: np.ndarray, extent: list[float], size: int
) -> tuple[dict, dict[str, bytes]]:
    """The extra ``.json`` fields and the ``mask.png`` / ``seg.png`` members of a labelled sample."""
    label = class_id(truth["colour"], truth["shape"])
    box = [min(max(v / size, 0.0), 1.0) for v in extent]
    fields = {
        "class_id": label,
        "colour_id": list(COLOURS).index(truth["colour"]),
        "shape_id": SHAPES.index(truth["shape"]),
        "boxes": [box],
        "box_labels": [label],
    }
    inside = coverage >= 0.5
    members = {
        "mask.png": _png((inside * 255).astype(np.uint8)),
        "seg.png": _png((inside * (label + 1)).astype(np.uint8)),
    }
    return fields, members


def _png(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_synth_shard(job: tuple[str, int, int, int, int, str, bool]) -> dict:
    path, start, stop, size, seed, split, labels = job
    combos = combinations(split)
    split_id = SPLITS.index(split)
    with AtomicShardWriter(path) as writer:
        for index in range(start, stop):
            rng = np.random.default_rng([seed, split_id, index])
            colour, shape, position = combos[int(rng.integers(len(combos)))]
            img, truth, coverage, extent = render_with_coverage(colour, shape, position, size, rng)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            key = f"{index:08d}"
            fields, members = labels_for(truth, coverage, extent, size) if labels else ({}, {})
            writer.write(
                {
                    "__key__": key,
                    "jpg": buf.getvalue(),
                    "txt": truth["caption"],
                    "json": {**truth, **fields, "key": key, "width": size, "height": size},
                    **members,
                }
            )
    return {"shard": path, "images": stop - start, "count": stop - start}


def write_synthetic(
    out: str,
    num: int,
    shard_size: int = 1000,
    size: int = 64,
    seed: int = 0,
    split: str = "train",
    workers: int = 1,
    progress: bool = True,
    labels: bool = False,
) -> list[str]:
    """Write ``num`` samples of ``split`` as shards under ``out``; returns the shard paths. With ``labels``,
    also each sample's class, box, mask and segmentation map (see the module docstring)."""
    if num < 1 or shard_size < 1:
        raise ValueError(f"--num and --shard-size must be >= 1 (got {num}, {shard_size})")
    if size < 16:
        raise ValueError(f"--size must be >= 16, got {size}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    outdir = Path(out)
    jobs = [
        (
            str(outdir / shard_name(i // shard_size, split)),
            i,
            min(num, i + shard_size),
            size,
            seed,
            split,
            labels,
        )
        for i in range(0, num, shard_size)
    ]
    results = _run_jobs(_write_synth_shard, jobs, workers, num, progress, f"synth {split}")
    return [r["shard"] for r in results]
