"""``ldm-info``: print the JSON plan of a model config (parameters, FLOPs per sample, ZeRO memory per rank).

ldm-info unet=sd2 autoencoder=kl_f8 text_encoder=openclip_vith14 resolution=256 world_size=8 precision=bf16
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from .config import build, build_offline, conf_dir
from .plan import build_plan


@dataclass
class InfoConfig:
    unet: Any = None
    autoencoder: Any = None
    text_encoder: Any = None
    resolution: int = 256
    world_size: int = 8
    precision: str = "bf16"


ConfigStore.instance().store(name="info_schema", node=InfoConfig)


def plan_for(cfg: DictConfig) -> dict:
    """Build the modules on the meta device (no weights are loaded) and compute the plan."""
    with torch.device("meta"):
        unet = build(cfg.unet, "unet", attention="math")
        ae = build(cfg.autoencoder, "autoencoder") if cfg.autoencoder else None
        te = build_offline(cfg.text_encoder, "text_encoder") if cfg.text_encoder else None
    if te is not None and unet.config.context_dim != te.context_dim:
        raise ValueError(
            f"unet.context_dim={unet.config.context_dim} but the text encoder gives {te.context_dim}"
        )
    return build_plan(unet, ae, te, cfg.resolution, cfg.world_size, cfg.precision)


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="info")
def main(cfg: DictConfig) -> None:
    print(json.dumps(plan_for(cfg), indent=2))


if __name__ == "__main__":
    main()
