"""Sharded checkpoints that survive being killed at any moment.

Layout under ``checkpoint.dir``::

    latest                      the tag of the newest complete checkpoint (replaced atomically)
    frozen/                     frozen modules (autoencoder, text encoder), written once per run
    step_00001000/
        model/ [disc/]          DeepSpeed's files per engine (ZeRO shards per rank)
        rank_00000.pt ...       per rank: data loader position, RNG states (tensors only: weights_only loads)
        ema/rank_00000.safetensors ...  per rank: its fragments of the EMA, with offsets (any world size loads them)
        trainer_state.json      step, samples seen, W&B run id, counters
        config.yaml             the resolved config
        COMMITTED               written by rank 0 after every rank finished writing

A save never touches a committed folder: every rank writes into ``.step_N.partial``, every file is fsynced,
rank 0 writes ``COMMITTED`` there, then renames it to ``step_N`` (moving an older ``step_N`` aside first) and
swaps ``latest``. A crash at any point leaves every committed checkpoint as it was; a half-written folder is
hidden and never looks like a checkpoint. ``resume=auto`` takes ``latest``, or the newest committed step when
``latest`` is missing, and refuses to start from scratch over step folders it cannot use.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

import torch

from data_pipeline.atomic import StorageError, atomic_json, atomic_save, atomic_write, fsync_dir, fsync_file
from data_pipeline.atomic import storage_error as _storage_error
from data_pipeline.errors import InputError

from . import distributed as dist_env
from .reshard import load_resharded, partitioned
from .rng import rng_state, set_rng_state
from .safe_load import weights_only_loads

log = logging.getLogger(__name__)
COMMITTED = "COMMITTED"
SCRATCH = ".universal"  # checkpoints converted for loading at another world size (deleted by the next save)
_STEP = re.compile(r"step_(\d{8})")


class CheckpointError(InputError):
    """No checkpoint can be resumed from where one was expected; the message says what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def committed(ckpt_dir: Path) -> list[Path]:
    """The committed checkpoint folders, oldest step first."""
    folders = [
        p for p in Path(ckpt_dir).glob("step_*") if _STEP.fullmatch(p.name) and (p / COMMITTED).is_file()
    ]
    return sorted(folders, key=lambda p: p.name)


def latest_tag(ckpt_dir: Path) -> str | None:
    f = Path(ckpt_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(ckpt_dir) / tag / COMMITTED).is_file() else None


def newest(ckpt_dir: Path) -> Path | None:
    """``latest``'s checkpoint, or the newest committed one when ``latest`` is missing or names none."""
    tag = latest_tag(ckpt_dir)
    if tag:
        return Path(ckpt_dir) / tag
    done = committed(ckpt_dir)
    if done:
        log.warning(
            "%s/latest names no committed checkpoint: using the newest committed, %s", ckpt_dir, done[-1].name
        )
    return done[-1] if done else None


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: ``auto`` (the newest committed in ckpt_dir, none for a new run),
    ``none``, or a path to a checkpoint folder or to a checkpoints folder (its newest)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = newest(ckpt_dir)
        if found is None and any(_STEP.fullmatch(p.name) for p in Path(ckpt_dir).glob("step_*")):
            raise CheckpointError(
                f"{ckpt_dir} holds step folders but none is committed: refusing to start from scratch over them "
                "(checkpoint.resume=none starts anew, checkpoint.resume=PATH resumes from a given checkpoint)"
            )
        return found
    path = Path(resume)
    if (path / COMMITTED).is_file():
        return path
    found = newest(path)
    if found is None:
        raise CheckpointError(
            f"checkpoint.resume={resume!r} is neither a committed checkpoint nor a folder with one"
        )
    return found


def _own_files(folder: Path, rank: int) -> list[Path]:
    """The DeepSpeed files ``rank`` wrote (its ZeRO shards; rank 0 also the unsharded model states)."""
    mine = f"zero_pp_rank_{rank}_"
    return [
        p for p in folder.rglob("*.pt") if mine in p.name or (rank == 0 and "zero_pp_rank_" not in p.name)
    ]


class Checkpointer:
    def __init__(self, ckpt_dir: str | Path, keep_last: int, rank: int, world_size: int,
                 device: torch.device | None = None):  # fmt: skip
        self.dir = Path(ckpt_dir)
        self.keep_last, self.rank, self.world = keep_last, rank, world_size
        self.device = device or torch.device("cpu")
        if rank == 0:  # leftovers of a crash in a save (the run folder is locked: nobody else writes here)
            for stale in self.dir.glob(".step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(self.dir / SCRATCH, ignore_errors=True)

    # -- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, engines: dict, loader, generators: dict, ema, trainer_state: dict,
             config_yaml: str, pause_before_commit=None) -> Path:  # fmt: skip
        tag = tag_for(step)
        work = self.dir / f".{tag}.partial"
        if self.rank == 0:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        dist_env.barrier()
        failure = None
        try:
            self._write(work, tag, engines, loader, generators, ema, trainer_state, config_yaml)
        except (OSError, RuntimeError) as exc:
            failure = exc if isinstance(exc, StorageError) else _storage_error(work, _as_os_error(exc, work))
        if pause_before_commit is not None:
            pause_before_commit()
        if (
            dist_env.all_reduce_max(float(failure is not None), self.device) > 0
        ):  # every rank has written, or not
            if self.rank == 0:
                shutil.rmtree(work, ignore_errors=True)
            raise failure or StorageError(f"writing checkpoint {tag} failed on another rank (see its log)")
        final = self.dir / tag
        if self.rank == 0:
            atomic_write(work / COMMITTED, time.strftime("%Y-%m-%dT%H:%M:%S"))
            old = None
            if final.exists():
                old = self.dir / f".{tag}.old-{secrets.token_hex(3)}"
                os.rename(final, old)
            os.rename(work, final)
            fsync_dir(self.dir)
            atomic_write(self.dir / "latest", tag)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.dir / SCRATCH, ignore_errors=True)
            self.rotate()
        dist_env.barrier()
        return final

    def _write(
        self, work: Path, tag: str, engines, loader, generators, ema, trainer_state, config_yaml
    ) -> None:
        for name, engine in engines.items():
            engine.save_checkpoint(str(work), tag=name, save_latest=False)
        for path in _own_files(work, self.rank):
            fsync_file(path)
        rank_state = {"world_size": self.world, "loader": loader.state_dict(), "rng": rng_state(generators)}
        atomic_save(work / f"rank_{self.rank:05d}.pt", lambda tmp: torch.save(rank_state, tmp))
        if ema is not None:
            ema.save(work)
        if self.rank == 0:
            atomic_json(work / "trainer_state.json", {**trainer_state, "tag": tag})
            atomic_write(work / "config.yaml", config_yaml)
        for sub in [work, *(p for p in work.iterdir() if p.is_dir())]:
            fsync_dir(sub)

    def rotate(self) -> None:
        """Delete all but the newest ``keep_last`` committed checkpoints (rank 0 only)."""
        if self.keep_last <= 0:
            return
        latest = latest_tag(self.dir)
        for old in committed(self.dir)[: -self.keep_last]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------------------
    def load(self, folder: Path, engines: dict, loader, generators: dict, ema, ema_module=None,
             restore_data: bool = True) -> dict:  # fmt: skip
        """Restore engines (weights + optimizer), EMA and, unless ``restore_data`` is False (rollback), the
        data position and RNG states. Returns the trainer state. Files load with ``weights_only=True``."""
        if not (folder / COMMITTED).is_file():
            raise CheckpointError(f"{folder} is not a committed checkpoint (no {COMMITTED} marker)")
        state = json.loads((folder / "trainer_state.json").read_text())
        resize = int(state.get("world_size", self.world)) != self.world
        with weights_only_loads(folder):
            for name, engine in engines.items():
                if resize and partitioned(folder / name):  # partitions cut for another world size
                    load_resharded(engine, folder, name, self.dir / SCRATCH, self.rank)
                    continue
                path, _ = engine.load_checkpoint(str(folder), tag=name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False, load_module_strict=True)  # fmt: skip
                if path is None:
                    raise CheckpointError(f"{folder / name}: DeepSpeed found no checkpoint to load")
            if restore_data:
                self._load_rank_state(folder, loader, generators, state)
        if ema is not None:
            ema.load(folder, ema_module)
        return state

    def _load_rank_state(self, folder: Path, loader, generators: dict, state: dict) -> None:
        mine = folder / f"rank_{self.rank:05d}.pt"
        if state.get("world_size") == self.world and mine.is_file():
            rank_state = torch.load(mine, map_location="cpu", weights_only=True)
            loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"], generators)
            return
        log.warning(
            "checkpoint was written by %s ranks, this run has %s: the data position is split anew from where "
            "every old rank stopped; random generators are re-seeded",
            state.get("world_size"),
            self.world,
        )
        files = sorted(folder.glob("rank_*.pt"))
        loader.load_states([torch.load(f, map_location="cpu", weights_only=True)["loader"] for f in files])


def _as_os_error(exc: BaseException, where: Path) -> OSError:
    """torch.save reports a full disk as RuntimeError('... iostream error'): give it the errno it means."""
    if isinstance(exc, OSError):
        return exc
    import errno

    try:
        full = shutil.disk_usage(where).free < 1 << 20
    except OSError:
        full = False
    return OSError(errno.ENOSPC if full else errno.EIO, str(exc))
