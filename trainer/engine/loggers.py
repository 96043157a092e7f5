"""Where metrics go (``logger._target_``): ``JsonlLogger`` writes ``<run_dir>/metrics.jsonl`` and PNGs;
``WandbLogger`` does the same and logs to W&B (online, offline or disabled). Only rank 0 starts a logger.

A run's W&B id is created once and kept in the checkpoint, so a resumed or requeued run continues the same
W&B run. The config and the git commit are attached; the API key is never logged or written anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from data_pipeline.atomic import atomic_save


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


@runtime_checkable
class Logger(Protocol):
    """What the training loop calls. Attributes: ``config`` (``log_every``, ``progress``)."""

    def start(self, run_dir: Path, run_id: str, config: dict, resumed: bool) -> None: ...

    def log(self, step: int, metrics: dict) -> None: ...

    def event(self, name: str, **fields) -> None: ...

    def image(self, step: int, key: str, image: Image.Image, caption: str = "") -> Path | None: ...

    def finish(self) -> None: ...


@dataclass
class JsonlLoggerConfig:
    _target_: str = "trainer.engine.loggers.JsonlLogger"
    log_every: int = 10
    progress: bool = True  # progress bar on rank 0


@dataclass
class WandbLoggerConfig(JsonlLoggerConfig):
    _target_: str = "trainer.engine.loggers.WandbLogger"
    project: str = "ldm"
    entity: str = ""
    mode: str = "offline"  # online | offline | disabled
    name: str = ""  # empty: the run's run_name
    tags: list[str] = field(default_factory=list)
    artifacts: bool = (
        False  # checkpoints (by reference: nothing is uploaded) and the resolved config as artifacts
    )


class JsonlLogger:
    """Metrics and events as JSON lines in ``<run_dir>/metrics.jsonl``; images as PNGs under ``samples/``.
    Does nothing until :meth:`start` (ranks other than 0 never start theirs)."""

    Config = JsonlLoggerConfig

    def __init__(self, config: JsonlLoggerConfig | None = None):
        self.config = config or JsonlLoggerConfig()
        self.run_dir: Path | None = None
        self._jsonl = None

    def start(self, run_dir: Path, run_id: str, config: dict, resumed: bool) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.event("resume" if resumed else "start", run_id=run_id, git_commit=config.get("git_commit", ""))

    def log(self, step: int, metrics: dict) -> None:
        if self._jsonl is not None:
            row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
            self._jsonl.write(json.dumps(row) + "\n")

    def event(self, name: str, **fields) -> None:
        """A one-off event (resume, rollback, preemption)."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"event": name, "time": time.time(), **fields}) + "\n")

    def image(self, step: int, key: str, image: Image.Image, caption: str = "") -> Path | None:
        """A PNG under ``<run_dir>/samples/``."""
        if self.run_dir is None:
            return None
        path = self.run_dir / "samples" / f"{key.replace('/', '_')}_{step:08d}.png"
        return atomic_save(path, lambda tmp: image.save(tmp, format="PNG"))

    def finish(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


class WandbLogger(JsonlLogger):
    """The JSONL log, and the same metrics, events (in the run summary) and images in Weights & Biases."""

    Config = WandbLoggerConfig

    def __init__(self, config: WandbLoggerConfig | None = None):
        super().__init__(config or WandbLoggerConfig())
        self.wandb = None
        self.logged_up_to, self.run_id = -1, ""

    def start(self, run_dir: Path, run_id: str, config: dict, resumed: bool) -> None:
        import wandb

        c = self.config
        os.environ.setdefault("WANDB_SILENT", "true")
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        # steps this W&B run already has (a run killed after logging past its last checkpoint logs them again on
        # resume): W&B keeps the first values, the JSONL log both
        self.logged_up_to = last_logged_step(Path(run_dir) / "metrics.jsonl") if resumed else -1
        self.wandb = wandb.init(  # mode=disabled gives a run object whose calls do nothing
            project=c.project,
            entity=c.entity or None,
            name=c.name or config.get("run_name") or None,
            mode=c.mode,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config={k: v for k, v in config.items() if "key" not in k.lower()},
            tags=list(c.tags) or None,
        )
        super().start(run_dir, run_id, config, resumed)
        self.run_id = run_id
        if c.artifacts and (Path(run_dir) / "config.yaml").is_file():
            art = wandb.Artifact(f"config-{run_id}", type="config")
            art.add_file(str(Path(run_dir) / "config.yaml"))
            self.wandb.log_artifact(art)

    def log(self, step: int, metrics: dict) -> None:
        super().log(step, metrics)
        if self.wandb is not None and step > self.logged_up_to:
            self.wandb.log(metrics, step=step)

    def event(self, name: str, **fields) -> None:
        super().event(name, **fields)
        if self.wandb is not None:
            self.wandb.summary[f"events/{name}"] = fields
            if name == "checkpoint" and self.config.artifacts and fields.get("path"):
                import wandb

                art = wandb.Artifact(f"checkpoint-{self.run_id}", type="checkpoint",
                                     metadata={"step": fields.get("step")})  # fmt: skip
                art.add_reference(Path(fields["path"]).resolve().as_uri(), checksum=False)
                self.wandb.log_artifact(art, aliases=["latest", f"step_{fields.get('step')}"])

    def image(self, step: int, key: str, image: Image.Image, caption: str = "") -> Path | None:
        path = super().image(step, key, image, caption)
        if self.wandb is not None and step > self.logged_up_to:
            import wandb

            self.wandb.log({key: wandb.Image(np.asarray(image), caption=caption)}, step=step)
        return path

    def finish(self) -> None:
        super().finish()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def last_logged_step(path: Path) -> int:
    """The highest step with metrics in a JSONL log (-1 when none)."""
    last = -1
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if "step" in row and "event" not in row:
                last = max(last, int(row["step"]))
    return last


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v
