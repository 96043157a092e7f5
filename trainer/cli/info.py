"""``ldm-info``: print the JSON plan of a model config (parameters, FLOPs per sample, ZeRO memory per rank).

ldm-info unet=sd2 autoencoder=kl_f8 text_encoder=openclip_vith14 resolution=256 world_size=8 precision=bf16
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from ..plan import plan_for
from ._hydra import run


def info(cfg: DictConfig) -> int:
    plan = plan_for(
        cfg.unet, cfg.autoencoder, cfg.text_encoder, cfg.resolution, cfg.world_size, cfg.precision
    )
    print(json.dumps(plan, indent=2))
    return 0


def main() -> None:
    run(info, "info", "ldm-info")


if __name__ == "__main__":
    main()
