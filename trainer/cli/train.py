"""``ldm-train``: train the autoencoder (``task=autoencoder``) or the UNet (``task=unet``) with DeepSpeed.

    ldm-train experiment=tiny_cpu                       # a one-minute CPU run on the synthetic shards
    torchrun --nproc_per_node 8 -m trainer.cli.train experiment=sd2_base_256 data.urls=...
    deepspeed --num_gpus 8 -m trainer.cli.train experiment=sd2_base_256 ...   # --local_rank is accepted
    ldm-train experiment=sd2_base_256 dry_run=true      # parameters, FLOPs, ZeRO memory; nothing runs
    ldm-train experiment=tiny_cpu --cfg job             # the resolved config

The procedure is trainer/train.py. After a stop signal the exit code is 0 and <run_dir>/PREEMPTED says so.
"""

from __future__ import annotations

from ..train import train
from ._hydra import run


def main() -> None:
    run(train, "train", "ldm-train")


if __name__ == "__main__":
    main()
