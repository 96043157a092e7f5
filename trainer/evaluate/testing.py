"""Stand-ins for tests and benches, so that nothing has to be downloaded: a random-init FID Inception weights file
(same architecture and file format as the real one) and a small random feature network."""

from __future__ import annotations

from pathlib import Path

import torch

from .fidelity import LOGITS, POOL


def write_random_fid_weights(path: str | Path, calibration: torch.Tensor, seed: int = 0) -> Path:
    """A random-init FID Inception state dict at ``path``. BatchNorm statistics are set from ``calibration``
    (uint8 images (B, 3, H, W)) so that activations neither vanish nor explode through the 94 layers."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random init
            return None

    path = Path(path)
    empty = path.with_name(path.name + ".empty")
    torch.save({}, empty)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = _Unloaded("inception-v3-compat", [POOL], feature_extractor_weights_path=str(empty))
    finally:
        empty.unlink()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(calibration)
    torch.save(FeatureExtractorInceptionV3.state_dict(model), path)
    return path


class RandomFeatureNetwork:
    """A small random conv net with the :class:`~.fidelity.FeatureNetwork` interface (any image size)."""

    def __init__(self, dim: int = 64, seed: int = 0, logits: bool = False):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 3, stride=2),
                torch.nn.ReLU(),
                torch.nn.Conv2d(16, 32, 3, stride=2),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(2),
                torch.nn.Flatten(),
                torch.nn.Linear(128, dim),
            )
            self.head = torch.nn.Linear(dim, 10)
        self.layers = (POOL, LOGITS) if logits else (POOL,)
        self.fingerprint = f"random-features:dim={dim}:seed={seed}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(images.float() / 255 * 2 - 1)
        out = {POOL: f}
        if LOGITS in self.layers:
            out[LOGITS] = self.head(f)
        return out
