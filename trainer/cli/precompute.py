"""``ldm-precompute``: encode every image once with the frozen autoencoder into latent shards.

    ldm-precompute data.urls='data/train/{000000..000099}.tar' weights.autoencoder=runs/ae/export out=data/latents
    torchrun --nproc_per_node 8 -m trainer.cli.precompute ...   # or srun: each rank owns whole input shards

See trainer/precompute.py (the procedure) and data_pipeline/latents.py (the format).
"""

from __future__ import annotations

from ..precompute import precompute
from ._hydra import run


def main() -> None:
    run(precompute, "precompute", "ldm-precompute")


if __name__ == "__main__":
    main()
