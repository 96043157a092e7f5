"""Small pieces shared by the stage tasks."""

from __future__ import annotations

import torch

from ..config import ConfigError


def images_to_model(images: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool):
    """uint8 (B, 3, H, W) from the loader -> [-1, 1] on the device."""
    x = images.to(device, non_blocking=True).to(dtype) / 127.5 - 1.0
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def check_zero_stage(cfg, highest: int = 3) -> None:
    if cfg.deepspeed.zero_stage not in range(highest + 1):
        raise ConfigError(f"deepspeed.zero_stage must be 0-{highest}, got {cfg.deepspeed.zero_stage}")


def require_images(data_keys: frozenset[str], task: str) -> None:
    if "image" not in data_keys:
        raise ConfigError(
            f"task={task} trains on images: data must be image shards (data=synthetic, data=laion)"
        )


def with_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> torch.nn.Module:
    """``module`` (freshly built) with the parameters under ``prefix`` in ``weights`` (full tensors: the EMA
    or the gathered raw weights), for sampling outside the engine. Every parameter must be given."""
    own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    params = {name for name, _ in module.named_parameters()}
    missing = sorted(params - set(own))
    if missing:
        raise KeyError(f"sampling weights lack {prefix}{missing[0]} (and {len(missing) - 1} more)")
    module.load_state_dict(own, strict=False)
    return module.eval().requires_grad_(False)
