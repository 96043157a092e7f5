"""FID, KID, precision/recall and Inception Score on the standard FID network, streaming.

The network is torch-fidelity's ``FeatureExtractorInceptionV3``: the TensorFlow FID Inception
(``pt_inception-2015-12-05``) ported to PyTorch, with TF 1.x bilinear resizing to 299 × 299 and uint8 input — the
network of the FID reference code (TTUR), torch-fidelity, clean-fid's ``legacy_tensorflow`` mode and the LDM paper.
Its weights are read from a local file (torch-fidelity's release ``weights-inception-2015-12-05-6726825d.pth``);
nothing is downloaded. The statistics are torch-fidelity's own functions, fed by a streaming loop: memory is a few
batches plus the (N, 2048) float32 feature matrix (kept only when KID or precision/recall need it) and a float64
2048 × 2048 running covariance.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from data_pipeline.progress import progress as progress_bar

from .sources import stack_runs

POOL = "2048"  # 2048-d pool features: FID, KID, precision/recall
LOGITS = "logits_unbiased"  # 1008-d logits without bias: Inception Score
NETWORK = "pt_inception-2015-12-05"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_FLAG = "--inception-weights / eval.inception_weights"


class FeatureNetwork(Protocol):
    """uint8 images (B, 3, H, W) -> {layer name: (B, D) float32 CPU tensor}; ``fingerprint`` names the weights."""

    layers: tuple[str, ...]
    fingerprint: str

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def _torch_fidelity(module: str):
    """``torch_fidelity.<module>``, or an error that says how to install it."""
    try:
        return importlib.import_module(f"torch_fidelity.{module}")
    except ImportError as exc:  # a dev dependency: pip install '.[dev]'
        raise ImportError(
            "ldm-eval fid/kid/prc/isc need torch-fidelity: pip install torch-fidelity==0.4.0 (or '.[dev]')"
        ) from exc


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_weights(path: Path) -> None:
    """Refuse anything but a plain state dict of the FID Inception before torch-fidelity unpickles the file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.inception_weights: {path} does not exist ({WEIGHTS_FLAG}: the FID Inception weights, "
            f"torch-fidelity's {WEIGHTS_FILE})"
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{WEIGHTS_FLAG}: {path} is not a plain PyTorch state dict ({exc})") from exc
    fc = sd.get("fc.weight") if isinstance(sd, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048) or "Mixed_7c.branch_pool.conv.weight" not in sd:
        hint = (
            " (it looks like torchvision's ImageNet Inception-v3, whose FIDs are not comparable with published "
            "ones)"
            if fc is not None and tuple(fc.shape) == (1000, 2048)
            else ""
        )
        raise ValueError(f"{WEIGHTS_FLAG}: {path} is not the FID Inception ({NETWORK}, {WEIGHTS_FILE}){hint}")


class FIDInception:
    """The FID Inception (torch-fidelity's port of ``pt_inception-2015-12-05``) from a local weights file."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", layers=(POOL,)):
        path = Path(weights)
        _check_weights(path)
        inception = _torch_fidelity("feature_extractor_inceptionv3")
        self.layers = tuple(layers)
        self.device = torch.device(device)
        self.model = inception.FeatureExtractorInceptionV3(
            "inception-v3-compat", list(self.layers), feature_extractor_weights_path=str(path)
        ).to(self.device)
        self.fingerprint = f"{NETWORK}:sha256={file_sha256(path)}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(images.to(self.device, non_blocking=True))
        return {name: t.float().cpu() for name, t in zip(self.layers, out, strict=True)}


class FeatureStats:
    """Running mean and covariance of features in float64 (batches merged exactly, Chan et al.), and optionally
    the feature matrix itself (float32, as torch-fidelity keeps it)."""

    def __init__(self, keep_features: bool = False, expected: int | None = None):
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.keep = keep_features
        self._buf: np.ndarray | None = None
        self._expected = expected

    def update(self, feats: np.ndarray) -> None:
        x = np.asarray(feats, dtype=np.float64)
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(0)
        xc = x - mb
        m2b = xc.T @ xc
        if self.n == 0:
            self.mean, self.m2 = mb, m2b
        else:
            delta = mb - self.mean
            total = self.n + nb
            self.m2 += m2b + np.outer(delta, delta) * (self.n * nb / total)
            self.mean = self.mean + delta * (nb / total)
        if self.keep:
            self._append(np.asarray(feats, dtype=np.float32))
        self.n += nb

    def _append(self, feats: np.ndarray) -> None:
        need = self.n + len(feats)
        if self._buf is None or need > len(self._buf):
            cap = max(need, self._expected or 0, 2 * (len(self._buf) if self._buf is not None else 0))
            buf = np.empty((cap, feats.shape[1]), dtype=np.float32)
            if self._buf is not None:
                buf[: self.n] = self._buf[: self.n]
            self._buf = buf
        self._buf[self.n : need] = feats

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        return self.m2 / (self.n - 1)

    @property
    def features(self) -> np.ndarray | None:
        return None if self._buf is None else self._buf[: self.n]


def extract(
    network: FeatureNetwork,
    batches: Iterable[list[torch.Tensor]],
    keep: Iterable[str] = (),
    total: int | None = None,
    desc: str = "features",
    progress: bool = True,
) -> dict[str, FeatureStats]:
    """Run ``network`` over image batches; running statistics per layer, feature matrices for ``keep``."""
    keep = set(keep)
    stats = {name: FeatureStats(name in keep, total) for name in network.layers}
    with progress_bar(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            for images in stack_runs(batch):
                for name, feats in network(images).items():
                    stats[name].update(feats.numpy())
                bar.update(len(images))
    return stats


# -- metrics: torch-fidelity's functions -----------------------------------------------------------------------
def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    m = _torch_fidelity("metric_fid")
    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    if s1["mu"].shape != s2["mu"].shape:
        raise ValueError(f"feature sizes differ: {s1['mu'].shape} vs {s2['mu'].shape} (another network?)")
    return float(m.fid_statistics_to_metric(s1, s2, verbose=False)[m.KEY_METRIC_FID])


def kid_from_features(
    fake: np.ndarray, real: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets), torch-fidelity's estimator and defaults."""
    m = _torch_fidelity("metric_kid")
    out = m.kid_features_to_metric(
        torch.from_numpy(np.asarray(fake)),
        torch.from_numpy(np.asarray(real)),
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        rng_seed=seed,
        verbose=False,
    )
    return float(out[m.KEY_METRIC_KID_MEAN]), float(out[m.KEY_METRIC_KID_STD])


def prc_from_features(
    fake: np.ndarray, real: np.ndarray, k: int = 3, batch_size: int = 1000, device: str = "cpu"
) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): k-NN balls around each set's features."""
    m = _torch_fidelity("metric_prc")
    f1, f2 = (torch.from_numpy(np.asarray(f, np.float32)).to(device) for f in (fake, real))
    precision, recall = m.calculate_precision_recall_part(f1, f2, k, batch_size)
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f_score": 2 * precision * recall / max(1e-5, precision + recall),
    }


def isc_from_logits(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) from ``logits_unbiased``, torch-fidelity's estimator."""
    m = _torch_fidelity("metric_isc")
    out = m.isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits, True, seed)
    return float(out[m.KEY_METRIC_ISC_MEAN]), float(out[m.KEY_METRIC_ISC_STD])
