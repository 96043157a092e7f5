"""CLIP score: 100 * max(cos(image embedding, text embedding), 0), with an OpenCLIP model from a weights file."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def load_clip(model_name: str, weights: str | Path | None, device: str = "cpu"):
    """An OpenCLIP model and its preprocessing and tokenizer; ``weights`` must be a local file (never fetched),
    None only for tests (random init)."""
    import open_clip

    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(
            f"eval.clip_weights: {weights} does not exist (an OpenCLIP checkpoint for {model_name})"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(weights) if weights else None
    )
    return model.eval().to(device), preprocess, open_clip.get_tokenizer(model_name)


@torch.no_grad()
def clip_score(model, tokenizer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per pair; ``images`` in [0, 1] (B, 3, H, W), resized and normalised as CLIP expects."""
    size = model.visual.image_size
    size = size if isinstance(size, tuple | list) else (size, size)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    x = F.interpolate(images.float(), size=tuple(size), mode="bicubic", antialias=True).clamp(0, 1)
    dev = next(model.parameters()).device
    img = F.normalize(model.encode_image(((x - mean) / std).to(dev)).float(), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer(prompts).to(dev)).float(), dim=-1)
    return 100 * (img * txt).sum(-1).clamp(min=0).cpu()
