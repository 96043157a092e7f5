"""Reference statistics (``--ref-stats``): computed once from the real images, reused by every evaluation.

An ``.npz`` file (read with ``allow_pickle=False``: no code runs on load) holding ``mu`` (D,) and ``sigma``
(D, D) in float64, ``n``, and — for KID and precision/recall — ``features`` (n, D) float32, plus ``network``
(which weights made them: ``pt_inception-2015-12-05:sha256=...``) and ``source`` (the folder). Files with just
``mu`` and ``sigma`` (TTUR's and pytorch-fid's precomputed statistics, same network) are read too; they serve
FID only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.atomic import atomic_stream


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None
    network: str = ""
    source: str = ""
    path: str = ""

    def require_features(self, metric: str) -> np.ndarray:
        if self.features is None:
            raise ValueError(
                f"--ref-stats {self.path}: holds mu/sigma only, {metric} needs the feature matrix "
                "(recompute it with ldm-eval from the real images)"
            )
        return self.features

    def check_network(self, fingerprint: str) -> None:
        if self.network and fingerprint and self.network != fingerprint:
            raise ValueError(
                f"--ref-stats {self.path}: computed with {self.network}, but the network now is {fingerprint}; "
                "statistics of different networks cannot be compared"
            )


def save_reference(path: str | Path, ref: ReferenceStats) -> Path:
    arrays = {
        "mu": np.asarray(ref.mu, np.float64),
        "sigma": np.asarray(ref.sigma, np.float64),
        "n": np.asarray(ref.n, np.int64),
        "network": np.asarray(ref.network),
        "source": np.asarray(ref.source),
    }
    if ref.features is not None:
        arrays["features"] = np.asarray(ref.features, np.float32)
    return atomic_stream(path, lambda f: np.savez(f, **arrays))


def load_reference(path: str | Path) -> ReferenceStats:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ref-stats {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"--ref-stats {path}: no 'mu' / 'sigma' arrays (keys: {sorted(z.files)})")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            features = z.get("features")
            n = int(z["n"]) if "n" in z else (len(features) if features is not None else 0)
            network = str(z["network"]) if "network" in z else ""
            source = str(z["source"]) if "source" in z else ""
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("--ref-stats"):
            raise
        raise ValueError(f"--ref-stats {path}: not a readable .npz file ({exc})") from exc
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"--ref-stats {path}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return ReferenceStats(mu, sigma, n, features, network, source, str(path))
