"""Metrics to W&B (online, offline or disabled) and, always, to ``<run_dir>/metrics.jsonl`` on rank 0.

A run's W&B id is created once and kept in the checkpoint, so a resumed or requeued run continues the same
W&B run. The config and the git commit are attached; the API key is never logged or written anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..train_config import LoggerConfig


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def new_run_id() -> str:
    """An 8-character W&B-style run id (lowercase letters and digits)."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class RunLogger:
    """Rank 0 logs; other ranks hold a logger that does nothing."""

    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, run_id: str, config: dict, enabled: bool, resumed: bool
    ):
        self.cfg, self.run_dir, self.run_id, self.enabled = cfg, Path(run_dir), run_id, enabled
        self.wandb = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.kind == "wandb" and cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            safe_config = {k: v for k, v in config.items() if "key" not in k.lower()}
            self.wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity or None,
                name=cfg.name or None,
                mode=cfg.mode,
                id=run_id,
                resume="allow",
                dir=str(self.run_dir),
                config=safe_config,
                tags=list(cfg.tags) or None,
            )
        elif cfg.kind not in ("wandb", "jsonl"):
            raise ValueError(f"logger.kind must be 'wandb' or 'jsonl', got {cfg.kind!r}")
        self.event(
            "start" if not resumed else "resume", run_id=run_id, git_commit=config.get("git_commit", "")
        )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def event(self, name: str, **fields) -> None:
        """A one-off event (resume, rollback, preemption) in the JSONL log and W&B's summary."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"event": name, "time": time.time(), **fields}) + "\n")
        if self.wandb is not None:
            self.wandb.summary[f"events/{name}"] = fields

    def image(self, step: int, key: str, image: Image.Image, caption: str = "") -> Path | None:
        """A PNG under ``<run_dir>/samples/`` and, with W&B, a logged image."""
        if not self.enabled:
            return None
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key.replace('/', '_')}_{step:08d}.png"
        image.save(path)
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(np.asarray(image), caption=caption)}, step=step)
        return path

    def finish(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v
