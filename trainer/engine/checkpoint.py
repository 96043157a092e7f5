"""Sharded checkpoints that survive being killed at any moment.

Layout under ``checkpoint.dir``::

    latest                      the tag of the newest complete checkpoint (replaced atomically)
    frozen/                     frozen modules (autoencoder, text encoder), written once per run
    step_00001000/
        model/ [disc/]          DeepSpeed's files per engine (ZeRO shards per rank)
        rank_00000.pt ...       per rank: data loader position, RNG states (tensors only: weights_only loads)
        ema.safetensors         rank 0's EMA of the trained weights
        trainer_state.json      step, samples seen, W&B run id, counters
        config.yaml             the resolved config
        COMMITTED               written by rank 0 after every rank finished writing

A save writes everything, waits for all ranks, then rank 0 writes ``COMMITTED`` and swaps ``latest``: a crash
before that leaves the previous checkpoint as ``latest``. Rotation (rank 0) keeps the newest ``keep_last``
committed checkpoints and never deletes the one ``latest`` names.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data_pipeline.atomic import atomic_json, atomic_save, atomic_write

from . import distributed as dist_env
from .rng import rng_state, set_rng_state

log = logging.getLogger(__name__)
COMMITTED = "COMMITTED"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (ckpt_dir / tag / COMMITTED).is_file() else None


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: ``auto`` (latest in ckpt_dir, or none), ``none``, or a path to a
    checkpoint folder or to a checkpoints folder (its latest)."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        return ckpt_dir / tag if tag else None
    path = Path(resume)
    if (path / COMMITTED).is_file():
        return path
    tag = latest_tag(path)
    if tag:
        return path / tag
    raise FileNotFoundError(
        f"checkpoint.resume={resume!r} is neither a committed checkpoint nor a folder with one"
    )


class Checkpointer:
    def __init__(self, ckpt_dir: str | Path, keep_last: int, rank: int, world_size: int):
        self.dir = Path(ckpt_dir)
        self.keep_last, self.rank, self.world = keep_last, rank, world_size

    # -- save ------------------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        engines: dict,
        loader,
        generators: dict,
        ema,
        trainer_state: dict,
        config_yaml: str,
        pause_before_commit=None,
    ) -> Path:
        tag = tag_for(step)
        folder = self.dir / tag
        if self.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / COMMITTED).unlink(missing_ok=True)
        dist_env.barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(folder), tag=name, save_latest=False)
        rank_state = {"world_size": self.world, "loader": loader.state_dict(), "rng": rng_state(generators)}
        atomic_save(folder / f"rank_{self.rank:05d}.pt", lambda tmp: torch.save(rank_state, tmp))
        if self.rank == 0:
            if ema is not None:
                shadow = ema.state_dict()
                atomic_save(folder / "ema.safetensors", lambda tmp: save_file(shadow, str(tmp)))
            atomic_json(folder / "trainer_state.json", {**trainer_state, "tag": tag})
            atomic_write(folder / "config.yaml", config_yaml)
        if pause_before_commit is not None:
            pause_before_commit()
        dist_env.barrier()  # every rank has written all its files
        if self.rank == 0:
            atomic_write(folder / COMMITTED, time.strftime("%Y-%m-%dT%H:%M:%S"))
            atomic_write(self.dir / "latest", tag)
            self.rotate()
        dist_env.barrier()
        return folder

    def rotate(self) -> None:
        """Delete all but the newest ``keep_last`` committed checkpoints (rank 0 only)."""
        if self.keep_last <= 0:
            return
        latest = latest_tag(self.dir)
        done = sorted(p for p in self.dir.glob("step_*") if (p / COMMITTED).is_file())
        for old in done[: -self.keep_last]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------------------
    def load(
        self, folder: Path, engines: dict, loader, generators: dict, ema, restore_data: bool = True
    ) -> dict:
        """Restore engines (weights + optimizer), EMA and, unless ``restore_data`` is False (rollback), the
        data position and RNG states. Returns the trainer state."""
        if not (folder / COMMITTED).is_file():
            raise FileNotFoundError(f"{folder} is not a committed checkpoint (no {COMMITTED} marker)")
        state = json.loads((folder / "trainer_state.json").read_text())
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(
                str(folder),
                tag=name,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=True,
            )
            if path is None:
                raise FileNotFoundError(f"{folder / name}: DeepSpeed found no checkpoint to load")
        if ema is not None:
            ema_file = folder / "ema.safetensors"
            shadow = load_file(str(ema_file)) if ema_file.is_file() and ema.is_main else {}
            if ema.is_main and shadow:
                device = "cpu" if ema.on_cpu else next(iter(engines.values())).device
                shadow = {k: v.to(device) for k, v in shadow.items()}
            ema.load_state_dict(shadow, int(state.get("ema_updates", 0)))
        if restore_data:
            self._load_rank_state(folder, loader, generators, state)
        return state

    def _load_rank_state(self, folder: Path, loader, generators: dict, state: dict) -> None:
        mine = folder / f"rank_{self.rank:05d}.pt"
        if state.get("world_size") == self.world and mine.is_file():
            rank_state = torch.load(mine, map_location="cpu", weights_only=True)
            loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"], generators)
            return
        log.warning(
            "checkpoint was written by %s ranks, this run has %s: data position restarts the epoch in "
            "progress and random generators are re-seeded",
            state.get("world_size"),
            self.world,
        )
        rank0 = torch.load(folder / "rank_00000.pt", map_location="cpu", weights_only=True)
        loader.load_state_dict(rank0["loader"])
