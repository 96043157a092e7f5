"""Evaluation during training: a fixed prompt set sampled with the EMA weights, spread over the ranks.

The training loop calls :func:`evaluate_prompts` every ``eval.every`` steps on every rank, with a pipeline built on
the EMA weights. Rank r generates prompts r, r + W, r + 2W, ... (one seed per prompt, so an image does not depend
on the number of ranks), computes its images' features and scores, and the ranks gather them; rank 0 computes the
metrics on the whole set, writes ``<out_dir>/step_<N>.json`` and ``step_<N>.png`` (a sample grid) atomically, and
every rank returns the same metrics dict, ready for the logger. Images are scored as the uint8 pixels a saved PNG
would hold, so ``ldm-eval`` on saved samples gives the same numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.atomic import atomic_stream

from ..inference.images import grid_image, to_uint8
from .fidelity import (
    LOGITS,
    POOL,
    FeatureNetwork,
    fid_from_stats,
    isc_from_logits,
    kid_from_features,
    prc_from_features,
)
from .reference import ReferenceStats


@dataclass
class EvalMetrics:
    """What :func:`evaluate_prompts` computes; each part is optional.

    ``network``: :class:`~.fidelity.FIDInception` (``eval.inception_weights``); with ``reference``
    (:func:`~.reference.load_reference` of ``eval.ref_stats``) it gives FID, and KID and precision/recall when
    the reference holds its feature matrix; Inception Score when the network has the ``logits_unbiased`` layer.
    ``clip_model`` / ``clip_tokenizer``: :func:`~.clip_score.load_clip` (``eval.clip_weights``) for the CLIP score.
    ``adherence``: the rule-based scorer, for prompts of the synthetic captioned-shapes set only.
    """

    network: FeatureNetwork | None = None
    reference: ReferenceStats | None = None
    clip_model: Any = None
    clip_tokenizer: Any = None
    adherence: bool = False
    batch_size: int = 8
    grid_images: int = 16
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_k: int = 3


def result_paths(out_dir: str | Path, step: int) -> tuple[Path, Path]:
    """``<out_dir>/step_<N>.json`` and its sample grid ``step_<N>.png``."""
    out = Path(out_dir)
    return out / f"step_{step}.json", out / f"step_{step}.png"


def _distributed(world_size: int) -> bool:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size > 1 and not initialized:
        raise RuntimeError(
            f"evaluate_prompts: world_size={world_size} but torch.distributed is not initialized"
        )
    return world_size > 1


def _local_pass(pipeline, prompts, seeds, opts, metrics: EvalMetrics, mine: list[int]) -> dict:
    """Generate and score this rank's prompts."""
    from .adherence import parse_prompt, read_image
    from .clip_score import clip_score

    feats: dict[str, list[np.ndarray]] = {}
    clip, adh, grid = [], [], {}
    for start in range(0, len(mine), metrics.batch_size):
        idx = mine[start : start + metrics.batch_size]
        batch_prompts = [prompts[i] for i in idx]
        images = pipeline.generate(batch_prompts, replace(opts, seeds=[int(seeds[i]) for i in idx]))
        hwc = to_uint8(images)  # what a saved PNG holds
        u8 = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
        if metrics.network is not None:
            for name, f in metrics.network(u8).items():
                feats.setdefault(name, []).append(f.numpy().astype(np.float32))
        if metrics.clip_model is not None:
            scores = clip_score(metrics.clip_model, metrics.clip_tokenizer, u8.float() / 255, batch_prompts)
            clip.append(scores.double().numpy())
        if metrics.adherence:
            for img, prompt in zip(hwc, batch_prompts, strict=True):
                want, got = parse_prompt(prompt), read_image(img)
                adh.append((got.colour == want[0], got.shape == want[1], got.position == want[2]))
        grid.update({i: hwc[k] for k, i in enumerate(idx) if i < metrics.grid_images})
    return {
        "index": np.asarray(mine, dtype=np.int64),
        "features": {k: np.concatenate(v) for k, v in feats.items()},
        "clip": np.concatenate(clip) if clip else None,
        "adherence": np.asarray(adh, dtype=bool).reshape(-1, 3),
        "grid": grid,
    }


def _merge(parts: list[dict]) -> dict:
    """The ranks' parts in prompt order (ranks without prompts, when there are more ranks than prompts, left out)."""
    parts = [p for p in parts if len(p["index"])] or parts[:1]
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index, kind="stable")

    def cat(get):
        arrays = [get(p) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)[order]

    layers = parts[0]["features"].keys()
    return {
        "n": len(index),
        "features": {k: cat(lambda p, k=k: p["features"][k]) for k in layers},
        "clip": cat(lambda p: p["clip"]),
        "adherence": cat(lambda p: p["adherence"]),
        "grid": {i: img for p in parts for i, img in p["grid"].items()},
    }


def compute_metrics(merged: dict, metrics: EvalMetrics) -> dict[str, float]:
    """Metrics of the whole prompt set from the merged per-image features and scores."""
    out: dict[str, float] = {}
    feats, ref, n = merged["features"], metrics.reference, merged["n"]
    if POOL in feats and ref is not None:
        ref.check_network(getattr(metrics.network, "fingerprint", ""))
        fake = feats[POOL].astype(np.float64)
        if n >= 2:
            out["fid"] = fid_from_stats(fake.mean(0), np.cov(fake, rowvar=False), ref.mu, ref.sigma)
        if ref.features is not None and n >= 2:
            size = min(metrics.kid_subset_size, n, len(ref.features))
            out["kid"], out["kid_std"] = kid_from_features(
                feats[POOL], ref.features, metrics.kid_subsets, size
            )
        if ref.features is not None and n > metrics.prc_k:
            out.update(prc_from_features(feats[POOL], ref.features, metrics.prc_k))
    if LOGITS in feats and n >= 10:
        out["inception_score"], out["inception_score_std"] = isc_from_logits(feats[LOGITS])
    if merged["clip"] is not None:
        out["clip_score"] = float(merged["clip"].mean())
    if metrics.adherence and n:
        hits = merged["adherence"]
        for j, key in enumerate(("colour", "shape", "position")):
            out[f"adherence_{key}"] = float(hits[:, j].mean())
        out["adherence_all"] = float(hits.all(axis=1).mean())
    return out


def _write(out_dir: Path, step: int, record: dict, grid: dict[int, np.ndarray]) -> None:
    json_path, grid_path = result_paths(out_dir, step)
    if grid:
        images = torch.from_numpy(np.stack([grid[i] for i in sorted(grid)])).permute(0, 3, 1, 2).float() / 255
        atomic_stream(grid_path, lambda f: grid_image(images).save(f, format="PNG"))
        record["grid"] = grid_path.name
    atomic_stream(json_path, lambda f: f.write(json.dumps(record, indent=1).encode()))


def evaluate_prompts(
    pipeline,
    prompts: list[str],
    seeds: list[int],
    opts,
    metrics: EvalMetrics,
    step: int,
    out_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Sample ``prompts`` (seed ``seeds[i]`` for prompt i) with ``pipeline`` (built on the EMA weights) and
    ``opts`` (a :class:`~trainer.inference.pipeline.GenerateOptions`; its seeds are replaced), spread over the ranks;
    returns the metrics on every rank; rank 0 writes ``step_<N>.json`` and ``step_<N>.png`` in ``out_dir``.

    Call it on every rank at the same step (it gathers with ``torch.distributed`` when ``world_size`` > 1; with
    NCCL, each rank's CUDA device must be set).
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"eval: {len(prompts)} prompts but {len(seeds)} seeds")
    if not 0 <= rank < world_size:
        raise ValueError(f"eval: rank {rank} outside world_size {world_size}")
    if metrics.adherence:
        from .adherence import parse_prompt

        for prompt in prompts:  # on every rank alike, before any collective
            try:
                parse_prompt(prompt)
            except ValueError as exc:
                raise ValueError(f"eval.adherence is for synthetic-set prompts only: {exc}") from exc
    distributed = _distributed(world_size)
    t0 = time.time()
    mine = list(range(rank, len(prompts), world_size))
    if not distributed:
        parts = [_local_pass(pipeline, prompts, seeds, opts, metrics, mine)]
    else:
        try:
            local = _local_pass(pipeline, prompts, seeds, opts, metrics, mine)
        except Exception as exc:  # every rank must reach the gather, or the others wait forever
            local = {"error": f"rank {rank}: {type(exc).__name__}: {exc}"}
        parts = [None] * world_size
        torch.distributed.all_gather_object(parts, local)
        errors = [p["error"] for p in parts if "error" in p]
        if errors:
            raise RuntimeError(f"eval at step {step} failed: {'; '.join(errors)}")
    outcome: list = [None]
    if rank == 0:
        try:
            merged = _merge(parts)
            result = compute_metrics(merged, metrics)
            record = {
                "step": step,
                "n": merged["n"],
                "world_size": world_size,
                "seconds": round(time.time() - t0, 3),
                "metrics": result,
                "network": getattr(metrics.network, "fingerprint", None),
                "ref_stats": metrics.reference.path if metrics.reference is not None else None,
                "generate": {k: v for k, v in asdict(opts).items() if k != "seeds"},
            }
            _write(Path(out_dir), step, record, merged["grid"])
            outcome = [result]
        except Exception as exc:  # tell the other ranks instead of leaving them waiting
            outcome = [f"{type(exc).__name__}: {exc}"]
            if not distributed:
                raise
    if distributed:
        torch.distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        raise RuntimeError(f"eval at step {step} failed on rank 0: {outcome[0]}")
    return outcome[0]


def eval_prompts(e) -> list[str]:
    """``eval.prompts``, or the lines of ``eval.prompts_file``."""
    if not e.prompts_file:
        return list(e.prompts)
    path = Path(e.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"eval.prompts_file: {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"eval.prompts_file: {path} holds no prompt")
    return prompts


def check_eval(e) -> None:
    """Before anything runs: the prompt set, the weight files and, for ``eval.adherence``, that every prompt is
    one the rule-based scorer reads (raises ValueError / FileNotFoundError naming the key)."""
    prompts = eval_prompts(e)
    for key in ("inception_weights", "ref_stats", "clip_weights"):
        path = getattr(e, key)
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"eval.{key}: {path} does not exist")
    if e.ref_stats and not e.inception_weights:
        raise ValueError("eval.ref_stats needs eval.inception_weights (the features they were computed with)")
    if e.adherence:
        from .adherence import parse_prompt

        for prompt in prompts:
            try:
                parse_prompt(prompt)
            except ValueError as exc:
                raise ValueError(f"eval.adherence is for synthetic-set prompts only: {exc}") from None


def eval_metrics(e, device: torch.device) -> EvalMetrics | None:
    """The metrics ``eval.*`` asks for during training (None: only a sample grid), loaded once at start."""
    if not (e.inception_weights or e.clip_weights or e.adherence):
        return None
    from .reference import load_reference

    network = reference = clip = tokenizer = None
    if e.inception_weights:
        from .fidelity import FIDInception

        network = FIDInception(e.inception_weights, device)
    if e.ref_stats:
        if network is None:
            raise ValueError(
                "eval.ref_stats needs eval.inception_weights (the features they were computed with)"
            )
        reference = load_reference(e.ref_stats)
    if e.clip_weights:
        from .clip_score import load_clip

        clip, _, tokenizer = load_clip(e.clip_model, e.clip_weights, str(device))
    return EvalMetrics(network, reference, clip, tokenizer, e.adherence, e.batch_size)
