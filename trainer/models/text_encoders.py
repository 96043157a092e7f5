"""Condition encoders behind one interface: ``encoder(conditions) -> Conditioning(tokens, pooled, mask, labels)``.

* ``OpenCLIPTextEncoder`` — frozen OpenCLIP text tower, SD 2.x style (penultimate block, then ``ln_final``).
  Weights come from a pretrained tag (downloaded by open_clip in real runs) or a local checkpoint file; with
  neither it is randomly initialised (tests). Only the text tower is ever built.
* ``TransformerTextEncoder`` — a transformer trained jointly with the UNet (the LDM paper's text-to-image).
* ``ClassEmbedder`` — class labels (with a null class for classifier-free guidance): one token each for
  cross-attention, and the labels themselves for a UNet with a label embedding (``unet.num_classes``).

The unconditional and layout encoders are in ``conditions.py``. Each encoder says which batch keys it reads
(``batch_keys``), turns a training batch into its raw conditions (``conditions``: captions, labels, layouts; the
samples the data marked ``dropped`` get the null condition) and a prompt string into one (``parse``: what
``ldm-sample --prompt`` and ``eval.prompts`` give). ``trainable`` says whether the training engine optimizes the
encoder; frozen ones stay outside DeepSpeed. ``num_labels`` is how many class labels its ``Conditioning.labels``
take (0: it gives none).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

TINY_OPENCLIP = "ldm-tiny-text"
_TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


LAYERS = {"penultimate": 1, "last": 0}  # text_encoder.layer: blocks skipped from the end


@runtime_checkable
class ConditionEncoder(Protocol):
    """What the UNet stage and the pipeline call: raw conditions (captions, labels, layouts) -> tokens to attend
    to (and labels). Attributes: ``config``, ``context_dim`` (token width), ``trainable`` (optimized with the
    UNet), ``num_labels`` (class labels it gives the UNet's label embedding; 0: none)."""

    def forward(self, conditions: list) -> Conditioning: ...

    def batch_keys(self) -> frozenset[str]:
        """The batch keys :meth:`conditions` reads (the data source must provide them)."""
        ...

    def conditions(self, batch: dict) -> list:
        """A training batch's raw conditions; samples with ``batch["dropped"]`` set get the null condition."""
        ...

    def null_conditions(self, n: int, negative: str = "") -> list:
        """The unconditional (or negative) condition, ``n`` times, for classifier-free guidance."""
        ...

    def parse(self, text: str) -> Any:
        """A prompt string (``ldm-sample --prompt``, ``eval.prompts``) as a raw condition."""
        ...


def dropped(batch: dict) -> list[bool]:
    """Which samples of a batch had their conditions dropped (none when the source does not say)."""
    flags = batch.get("dropped")
    return [False] * len(batch["key"]) if flags is None else [bool(f) for f in flags]


class TextConditions:
    """Captions are the conditions (a dropped caption is already empty); the empty caption (or the negative
    prompt) is the null one."""

    num_labels = 0

    def batch_keys(self) -> frozenset[str]:
        return frozenset({"caption"})

    def conditions(self, batch: dict) -> list:
        return list(batch["caption"])

    def null_conditions(self, n: int, negative: str = "") -> list:
        return [negative] * n

    def parse(self, text: str) -> str:
        return text


@dataclass
class Conditioning:
    tokens: torch.Tensor  # (B, T, D): what the UNet cross-attends to
    pooled: torch.Tensor  # (B, D'): one vector per condition
    mask: torch.Tensor  # (B, T) bool: real (not padding) tokens
    labels: torch.Tensor | None = (
        None  # (B,) long: class labels for the UNet's label embedding, null included
    )


@dataclass
class OpenCLIPConfig:
    _target_: str = "trainer.models.text_encoders.OpenCLIPTextEncoder"
    model_name: str = "ViT-H-14"
    pretrained: str = (
        ""  # an open_clip tag (laion2b_s32b_b79k) or a checkpoint file; "" = random init (tests only)
    )
    layer: str = "penultimate"  # penultimate (SD 2.x) | last: the block whose output the UNet attends to
    trainable: bool = False
    model_config: dict[str, Any] = field(default_factory=dict)  # register an architecture under model_name
    pad_id: int = 0  # the token after the end token: 0 (open_clip, SD 2.x) or 49407, the end token (SD 1.x)


@dataclass
class TransformerTextConfig:
    _target_: str = "trainer.models.text_encoders.TransformerTextEncoder"
    width: int = 512
    layers: int = 8  # 0: no transformer, each token is its embedding + position (words do not mix)
    heads: int = 8
    context_length: int = 77
    trainable: bool = True


@dataclass
class ClassEmbedderConfig:
    _target_: str = "trainer.models.text_encoders.ClassEmbedder"
    num_classes: int = 1000
    dim: int = 512
    trainable: bool = True
    key: str = (
        "class_id"  # the batch key holding the labels (data.fields: [class_id]); "caption": parse captions
    )


def _tokenizer_module():
    """open_clip's tokenizer module (CLIP's BPE, its vocabulary shipped with open_clip), loaded on its own when
    open_clip is not imported yet: ``import open_clip`` first builds every model family (about 2.5 s per process
    on a CPU core, paid by every rank, ldm-sample and ldm-export), and the tokenizer needs none of it."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    name = "_ldm_open_clip_tokenizer"
    if name not in sys.modules:
        package = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
        if package is None or not package.submodule_search_locations:
            raise ImportError("the CLIP tokenizer needs open_clip_torch (pip install open_clip_torch)")
        path = Path(package.submodule_search_locations[0]) / "tokenizer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def _tokenizer(context_length: int):
    return _tokenizer_module().SimpleTokenizer(context_length=context_length)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


class OpenCLIPTextEncoder(TextConditions, nn.Module):
    """Frozen OpenCLIP text tower; ``tokens`` are the penultimate (or last) block's output through ``ln_final``."""

    Config = OpenCLIPConfig

    def __init__(self, config: OpenCLIPConfig | None = None, **fields):
        super().__init__()
        import open_clip
        from open_clip.factory import _MODEL_CONFIGS, get_model_config
        from open_clip.model import _build_text_tower

        fields.pop("_target_", None)
        cfg = config if config is not None else OpenCLIPConfig(**fields)
        self.config, self.trainable = cfg, cfg.trainable
        if cfg.layer not in LAYERS:
            raise ValueError(f"text_encoder.layer must be one of {sorted(LAYERS)}, got {cfg.layer!r}")
        if cfg.model_config:
            _MODEL_CONFIGS[cfg.model_name] = dict(cfg.model_config)
        elif cfg.model_name == TINY_OPENCLIP:
            _MODEL_CONFIGS[TINY_OPENCLIP] = _TINY_CFG
        arch = get_model_config(cfg.model_name)
        if arch is None:
            raise ValueError(f"text_encoder.model_name {cfg.model_name!r} is not an open_clip architecture")
        self.text = _build_text_tower(
            arch["embed_dim"], arch["text_cfg"], quick_gelu=arch.get("quick_gelu", False)
        )
        self.quick_gelu = bool(arch.get("quick_gelu", False))
        if cfg.pretrained:
            self._load_pretrained(cfg, open_clip)
        self.tokenizer = _tokenizer(self.text.context_length)
        self.context_dim = self.text.transformer.width
        if not self.trainable:
            self.eval().requires_grad_(False)

    def _load_pretrained(self, cfg: OpenCLIPConfig, open_clip) -> None:
        path = Path(cfg.pretrained).expanduser()
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".safetensors") or "/" in cfg.pretrained:
            if not path.is_file():
                raise FileNotFoundError(f"text_encoder.pretrained: checkpoint {str(path)!r} does not exist")
            sd = _load_state_dict(path)
        else:  # a pretrained tag: open_clip fetches (or finds in its cache) the full CLIP checkpoint
            sd = open_clip.create_model(cfg.model_name, pretrained=cfg.pretrained).state_dict()
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        text_sd = {k: v for k, v in sd.items() if k in self.text.state_dict()}
        missing = set(self.text.state_dict()) - set(text_sd)
        if missing:
            raise KeyError(
                f"text_encoder.pretrained {cfg.pretrained!r} lacks text weights: {sorted(missing)[:5]}"
            )
        self.text.load_state_dict(text_sd)

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids, padded after the end token with ``pad_id``."""
        ids = self.tokenizer(list(captions))
        if self.config.pad_id:
            ids = torch.where(ids == 0, torch.full_like(ids, self.config.pad_id), ids)
        return ids

    def forward(self, captions: list[str]) -> Conditioning:
        t = self.text
        ids = self.tokenize(captions).to(t.token_embedding.weight.device)
        ends = ids.argmax(dim=-1)  # the (first) end token: the highest id
        real = torch.arange(ids.shape[1], device=ids.device)[None] <= ends[:, None]
        x = t.token_embedding(ids) + t.positional_embedding
        blocks = t.transformer.resblocks
        stop = len(blocks) - LAYERS[self.config.layer]
        for block in blocks[:stop]:
            x = block(x, attn_mask=t.attn_mask)
        tokens = t.ln_final(x)
        if stop < len(blocks):  # the pooled embedding is CLIP's: from the last block
            x = blocks[-1](x, attn_mask=t.attn_mask)
        pooled = t.ln_final(x)[torch.arange(ids.shape[0], device=ids.device), ends]
        if t.text_projection is not None:
            proj = t.text_projection
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return Conditioning(tokens, pooled, real)


class TransformerTextEncoder(TextConditions, nn.Module):
    """A bidirectional transformer over CLIP BPE tokens, trained with the UNet (LDM's BERT-style encoder)."""

    Config = TransformerTextConfig

    def __init__(self, config: TransformerTextConfig | None = None, **fields):
        super().__init__()
        fields.pop("_target_", None)
        cfg = config if config is not None else TransformerTextConfig(**fields)
        self.config, self.trainable, self.context_dim = cfg, cfg.trainable, cfg.width
        self.tokenizer = _tokenizer(cfg.context_length)
        self.token_embedding = nn.Embedding(len(self.tokenizer.encoder), cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            cfg.width,
            cfg.heads,
            4 * cfg.width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # layers=0: each token's output is its own embedding (+ position), independent of the other words
        self.transformer = (
            nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False) if cfg.layers else None
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if not self.trainable:
            self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions))

    def forward(self, captions: list[str]) -> Conditioning:
        ids = self.tokenize(captions).to(self.token_embedding.weight.device)
        mask = ids != 0
        x = self.token_embedding(ids) + self.positional_embedding
        if self.transformer is not None:
            x = self.transformer(x, src_key_padding_mask=~mask)
        tokens = self.ln_final(x)
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return Conditioning(tokens, pooled, mask)


class ClassEmbedder(nn.Module):
    """Class labels -> one token each, and the labels themselves (``Conditioning.labels``, for a UNet with
    ``num_classes = num_classes + 1``); label ``num_classes`` (or -1) is the null class for guidance."""

    Config = ClassEmbedderConfig

    def __init__(self, config: ClassEmbedderConfig | None = None, **fields):
        super().__init__()
        fields.pop("_target_", None)
        cfg = config if config is not None else ClassEmbedderConfig(**fields)
        self.config, self.trainable, self.context_dim = cfg, cfg.trainable, cfg.dim
        self.num_labels = cfg.num_classes + 1
        self.embedding = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        if not self.trainable:
            self.requires_grad_(False)

    def batch_keys(self) -> frozenset[str]:
        return frozenset({self.config.key})

    def parse(self, text: str) -> int:
        """A label written as text ("7"); the empty string is the null class."""
        text = str(text).strip()
        if not text:
            return -1
        try:
            label = int(text)
        except ValueError:
            raise ValueError(f"a class-conditional model takes class ids as prompts, got {text!r}") from None
        if not -1 <= label < self.config.num_classes:
            raise ValueError(
                f"class {label} is outside 0..{self.config.num_classes - 1} (text_encoder.num_classes)"
            )
        return label

    def conditions(self, batch: dict) -> list:
        values = batch[self.config.key]
        labels = [self.parse(v) if isinstance(v, str) else int(v) for v in values]
        return [-1 if d else y for y, d in zip(labels, dropped(batch), strict=True)]

    def null_conditions(self, n: int, negative: str = "") -> list:
        return [-1] * n

    def forward(self, labels: torch.Tensor | list[int]) -> Conditioning:
        y = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        y = torch.where(y < 0, torch.full_like(y, self.config.num_classes), y)
        pooled = self.embedding(y)
        ones = torch.ones(y.shape[0], 1, dtype=torch.bool, device=y.device)
        return Conditioning(pooled[:, None], pooled, ones, labels=y)
