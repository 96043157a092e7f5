"""``ldm-eval fid | kid | prc | ref-stats``: the FID Inception metrics, streamed, with reusable reference
statistics. Prints one JSON object (keys as torch-fidelity's, shortened: fid, kid, kid_std, precision, recall,
f_score, inception_score)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .fidelity import LOGITS, NETWORK, POOL, WEIGHTS_FILE

METRICS = ("fid", "kid", "prc", "isc")


def _check_flags(args) -> None:
    limits = [("--batch-size", "batch_size", 1), ("--size", "size", 0), ("--workers", "workers", 0)]
    limits += [("--kid-subset-size", "kid_subset_size", 2), ("--kid-subsets", "kid_subsets", 1)]
    limits += [("--prc-k", "prc_k", 1), ("--prc-batch-size", "prc_batch_size", 1)]
    for flag, name, low in limits:
        value = getattr(args, name, low)
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")


def _extract(network, src, args, keep, desc):
    from .fidelity import extract

    batches = src.batches(args.batch_size, args.workers)
    return extract(network, batches, keep, src.count, f"ldm-eval {desc}", not args.no_progress)


def ref_stats(args) -> dict:
    """Write REAL's statistics (mu, sigma and the feature matrix) to --ref-stats."""
    from .fidelity import FIDInception
    from .reference import ReferenceStats, save_reference
    from .sources import open_source

    _check_flags(args)
    src = open_source(args.real, args.size, args.recursive)
    network = FIDInception(args.inception_weights, args.device)
    real = _extract(network, src, args, {POOL}, "real")[POOL]
    ref = ReferenceStats(
        real.mean, real.sigma, real.n, real.features, network.fingerprint, str(src.path.resolve())
    )
    save_reference(args.ref_stats, ref)
    return {
        "ref_stats": str(args.ref_stats),
        "n": real.n,
        "network": network.fingerprint,
        "source": ref.source,
    }


def fidelity(args) -> dict:
    """fid / kid / prc (and isc) between REAL (or --ref-stats) and FAKE, streamed in batches."""
    from .fidelity import FIDInception, fid_from_stats, isc_from_logits, kid_from_features, prc_from_features
    from .reference import ReferenceStats, load_reference, save_reference
    from .sources import open_source

    _check_flags(args)
    metrics = list(dict.fromkeys([args.cmd, *args.also, *(["kid"] if args.kid else [])]))
    need_features = "kid" in metrics or "prc" in metrics
    ref_file = Path(args.ref_stats) if args.ref_stats else None
    reuse = ref_file is not None and ref_file.is_file()
    if args.real is None and not reuse:
        raise ValueError(f"give REAL, or --ref-stats with an existing file (got {args.ref_stats or 'none'})")
    fake_src = open_source(args.fake, args.size, args.recursive)
    real_src = None if reuse else open_source(args.real, args.size, args.recursive)
    network = FIDInception(
        args.inception_weights, args.device, (POOL, LOGITS) if "isc" in metrics else (POOL,)
    )
    if reuse:
        ref = load_reference(ref_file)
        if args.real is not None and ref.source and Path(args.real).resolve() != Path(ref.source):
            raise ValueError(f"--ref-stats {ref_file} was computed from {ref.source}, not {args.real}")
        ref.check_network(network.fingerprint)
        if need_features:  # fail before the long pass over FAKE
            ref.require_features(" and ".join(m for m in metrics if m in ("kid", "prc")))
    else:
        # the feature matrix is kept whenever the statistics are saved, so that a later kid / prc can reuse them
        real = _extract(network, real_src, args, {POOL} if need_features or ref_file else set(), "real")[POOL]
        source = str(real_src.path.resolve())
        ref = ReferenceStats(real.mean, real.sigma, real.n, real.features, network.fingerprint, source)
        if ref_file is not None:
            ref.path = str(save_reference(ref_file, ref))
    keep = ({POOL} if need_features else set()) | ({LOGITS} if "isc" in metrics else set())
    fake_all = _extract(network, fake_src, args, keep, "fake")
    fake = fake_all[POOL]
    out: dict = {"n_real": ref.n, "n_fake": fake.n, "network": network.fingerprint}
    if ref_file is not None:
        out["ref_stats"] = str(ref_file)
    if "fid" in metrics:
        out["fid"] = fid_from_stats(fake.mean, fake.sigma, ref.mu, ref.sigma)
    if "kid" in metrics:
        size = min(args.kid_subset_size, fake.n, ref.n)
        if size < args.kid_subset_size:
            print(
                f"ldm-eval: --kid-subset-size {args.kid_subset_size} > images; using {size}", file=sys.stderr
            )
        real_f = ref.require_features("kid")
        out["kid"], out["kid_std"] = kid_from_features(
            fake.features, real_f, args.kid_subsets, size, args.seed
        )
        out["kid_subset_size"] = size
    if "prc" in metrics:
        real_f = ref.require_features("precision/recall")
        out.update(prc_from_features(fake.features, real_f, args.prc_k, args.prc_batch_size, args.device))
        out["prc_k"] = args.prc_k
    if "isc" in metrics:
        logits = fake_all[LOGITS].features
        out["inception_score"], out["inception_score_std"] = isc_from_logits(logits, seed=args.seed)
    return out


def _common(f: argparse.ArgumentParser) -> None:
    f.add_argument(
        "--inception-weights",
        required=True,
        help=f"the FID Inception ({NETWORK}) state dict: torch-fidelity's {WEIGHTS_FILE}",
    )
    f.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: %(default)s"
    )
    f.add_argument(
        "--batch-size", type=int, default=64, help="images per network call (default: %(default)s)"
    )
    f.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="decoding processes (default: %(default)s)",
    )
    f.add_argument(
        "--size", type=int, default=0, help="resize + center-crop to SIZE first (default 0: as they are)"
    )
    f.add_argument("--recursive", action="store_true", help="also read images in subfolders")
    f.add_argument("--no-progress", action="store_true")


def add_fidelity_parsers(sub) -> None:
    helps = {
        "fid": "FID on the standard FID Inception (comparable with published numbers)",
        "kid": "KID (torch-fidelity's estimator) on the FID Inception",
        "prc": "precision/recall (Kynkäänniemi et al. 2019, k=3) on the FID Inception",
    }
    for name, help_ in helps.items():
        f = sub.add_parser(name, help=help_, description=f"{help_}. Prints one JSON object.")
        f.add_argument(
            "real", nargs="?", help="real images: a folder of images or of .tar shards (or --ref-stats)"
        )
        f.add_argument("fake", help="generated images: a folder of images or of .tar shards")
        _common(f)
        f.add_argument(
            "--ref-stats",
            default="",
            help="real-image statistics (.npz): read if the file exists (REAL may then be omitted), else written",
        )
        f.add_argument("--also", action="append", default=[], choices=METRICS, help="more metrics, same pass")
        f.add_argument("--kid", action="store_true", help="same as --also kid")
        f.add_argument("--kid-subsets", type=int, default=100, help="default: %(default)s")
        f.add_argument("--kid-subset-size", type=int, default=1000, help="default: %(default)s")
        f.add_argument(
            "--prc-k", type=int, default=3, help="precision/recall neighbourhood (default: %(default)s)"
        )
        f.add_argument(
            "--prc-batch-size",
            type=int,
            default=1000,
            help="rows per distance block; memory ~40 B x rows x images (default: %(default)s)",
        )
        f.add_argument(
            "--seed", type=int, default=2020, help="KID subsets, IS shuffle (torch-fidelity's 2020)"
        )
        f.set_defaults(fn=fidelity)
    r = sub.add_parser(
        "ref-stats",
        help="precompute real-image statistics for --ref-stats",
        description="Write REAL's FID Inception statistics (mu, sigma, features) to --ref-stats. Prints JSON.",
    )
    r.add_argument("real", help="real images: a folder of images or of .tar shards")
    r.add_argument("--ref-stats", required=True, help="the .npz file to write")
    _common(r)
    r.set_defaults(fn=ref_stats)
