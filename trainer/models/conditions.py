"""Condition encoders beyond text and class labels (the ``text_encoder`` slot; protocol in text_encoders.py).

* ``Unconditional`` — no condition: one constant (zero) token for the UNet's cross-attention, so an
  unconditional model has the same architecture (and export) as a conditional one.
* ``LayoutEncoder`` — layout-to-image as in LDM: each object's class and its box's two corners become tokens
  (corners quantised on a ``bins`` x ``bins`` grid, one token per grid cell), read by a small transformer
  trained with the UNet; the UNet cross-attends to its output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .text_encoders import Conditioning, dropped

Layout = list[tuple[int, list[float]]]  # one raw layout: (class id, normalised [x0, y0, x1, y1]) per object


@dataclass
class UnconditionalConfig:
    _target_: str = "trainer.models.conditions.Unconditional"
    dim: int = 64  # width of the constant token (= unet.context_dim)


class Unconditional(nn.Module):
    """Every condition is the null one: a single zero token. Prompts are ignored (one prompt = one sample)."""

    Config = UnconditionalConfig
    num_labels = 0

    def __init__(self, config: UnconditionalConfig | None = None):
        super().__init__()
        self.config = config or UnconditionalConfig()
        self.trainable, self.context_dim = False, self.config.dim
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows .to(device, dtype)

    def batch_keys(self) -> frozenset[str]:
        return frozenset()

    def conditions(self, batch: dict) -> list:
        return [None] * len(batch["key"])

    def null_conditions(self, n: int, negative: str = "") -> list:
        return [None] * n

    def parse(self, text: str) -> None:
        return None

    def forward(self, conditions: list) -> Conditioning:
        n, a = len(conditions), self.anchor
        tokens = torch.zeros(n, 1, self.context_dim, device=a.device, dtype=a.dtype)
        return Conditioning(tokens, tokens[:, 0], torch.ones(n, 1, dtype=torch.bool, device=a.device))


@dataclass
class LayoutConfig:
    _target_: str = "trainer.models.conditions.LayoutEncoder"
    num_classes: int = 24  # object classes (synthetic shapes: colour x shape)
    max_objects: int = 8
    bins: int = 16  # each corner coordinate is quantised into this many bins
    width: int = 64  # token width (= unet.context_dim)
    layers: int = 2
    heads: int = 4
    boxes_key: str = "boxes"  # batch keys (data.fields): normalised [x0, y0, x1, y1] per object...
    labels_key: str = "box_labels"  # ... and their class ids
    trainable: bool = True


class LayoutEncoder(nn.Module):
    """Boxes with class labels -> ``1 + 3 * max_objects`` tokens: a start token, then (class, top-left corner,
    bottom-right corner) per object, padded; a transformer over them (padding masked out as keys)."""

    Config = LayoutConfig
    num_labels = 0

    def __init__(self, config: LayoutConfig | None = None):
        super().__init__()
        cfg = self.config = config or LayoutConfig()
        self.trainable, self.context_dim = cfg.trainable, cfg.width
        self.start, self.pad = cfg.num_classes + cfg.bins**2, cfg.num_classes + cfg.bins**2 + 1
        self.length = 1 + 3 * cfg.max_objects
        self.token_embedding = nn.Embedding(self.pad + 1, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(self.length, cfg.width) * 0.01)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if not self.trainable:
            self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)

    def batch_keys(self) -> frozenset[str]:
        return frozenset({self.config.boxes_key, self.config.labels_key})

    def conditions(self, batch: dict) -> list:
        boxes, labels = batch[self.config.boxes_key], batch[self.config.labels_key]
        return [
            [] if d else [(int(y), [float(v) for v in b]) for y, b in zip(ys, bs, strict=True)]
            for bs, ys, d in zip(boxes, labels, dropped(batch), strict=True)
        ]

    def null_conditions(self, n: int, negative: str = "") -> list:
        return [[] for _ in range(n)]

    def parse(self, text: str) -> Layout:
        """``[[class, x0, y0, x1, y1], ...]`` (JSON, normalised coordinates); "" is the empty layout."""
        if not str(text).strip():
            return []
        try:
            return [(int(o[0]), [float(v) for v in o[1:5]]) for o in json.loads(text)]
        except (ValueError, TypeError, IndexError):
            raise ValueError(
                f"a layout prompt is JSON [[class, x0, y0, x1, y1], ...], got {text!r}"
            ) from None

    def corner(self, x: float, y: float) -> int:
        b = self.config.bins
        ix, iy = (min(max(int(v * b), 0), b - 1) for v in (x, y))
        return self.config.num_classes + iy * b + ix

    def tokenize(self, layouts: list[Any]) -> torch.Tensor:
        cfg = self.config
        ids = torch.full((len(layouts), self.length), self.pad, dtype=torch.long)
        ids[:, 0] = self.start
        for i, layout in enumerate(layouts):
            if len(layout) > cfg.max_objects:
                raise ValueError(f"{len(layout)} objects > text_encoder.max_objects={cfg.max_objects}")
            for j, (label, (x0, y0, x1, y1)) in enumerate(layout):
                if not 0 <= int(label) < cfg.num_classes:
                    raise ValueError(
                        f"class {label} is outside 0..{cfg.num_classes - 1} (text_encoder.num_classes)"
                    )
                ids[i, 1 + 3 * j : 4 + 3 * j] = torch.tensor(
                    [int(label), self.corner(x0, y0), self.corner(x1, y1)]
                )
        return ids

    def forward(self, layouts: list[Any]) -> Conditioning:
        ids = self.tokenize(layouts).to(self.token_embedding.weight.device)
        mask = ids != self.pad
        x = self.token_embedding(ids) + self.positional_embedding
        tokens = self.ln_final(self.transformer(x, src_key_padding_mask=~mask))
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return Conditioning(tokens, pooled, mask)
