"""The training procedure of ``ldm-train``: build everything from the config once, resume, loop, finish.

    ldm-train experiment=tiny_cpu                       # a one-minute CPU run on the synthetic shards
    torchrun --nproc_per_node 8 -m trainer.cli.train experiment=sd2_base_256 data.urls=...
    ldm-train experiment=sd2_base_256 dry_run=true      # parameters, FLOPs, ZeRO memory; nothing runs

:func:`prepare` turns the config into checked components (no process group, no engine); :class:`Run` holds
what a running job needs and its loop only calls methods of those components.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from data_pipeline.atomic import atomic_save, atomic_write
from data_pipeline.errors import REASONS
from data_pipeline.loader import DataSource
from data_pipeline.lock import FolderLock
from data_pipeline.progress import progress

from .config import ConfigError, build
from .diffusion.objectives import Diffusion
from .engine import distributed as D
from .engine.checkpoint import Checkpointer, resolve_resume, tag_for
from .engine.deepspeed_setup import grad_norm
from .engine.ema import ShardedEMA, full_fp32_params
from .engine.guards import PREEMPTED_MARKER, Faults, NonFiniteGuard, StopSignal
from .engine.loggers import Logger, git_commit, new_run_id
from .engine.optim import LRSchedule, Optimizer
from .engine.precision import Precision, precision
from .engine.rng import seed_everything
from .evaluate.periodic import check_eval, eval_metrics, eval_prompts, evaluate_prompts, result_paths
from .inference.images import grid_image
from .inference.pipeline import GenerateOptions
from .schema import TrainConfig
from .tasks.base import Task, TaskContext


@dataclass
class Parts:
    """The components of a run, built and checked from its config before any process group exists."""

    cfg: DictConfig
    task: Task
    data: DataSource
    optim: Optimizer
    lr_schedule: LRSchedule
    logger: Logger
    precision: Precision
    models: dict[str, nn.Module]


AT_LEAST = {  # numbers that must be at least this (a 0 would divide by zero or silently do nothing)
    "max_steps": 1, "checkpoint.every": 1, "checkpoint.keep_last": 0, "logger.log_every": 1, "ema.every": 1,
    "data.batch_size": 1, "data.num_workers": 0, "deepspeed.grad_accum": 1, "eval.every": 0, "eval.steps": 1,
    "guard.max_consecutive_bad": 0, "guard.max_rollbacks": 0,
}  # fmt: skip


def check_schema(cfg: DictConfig) -> None:
    """Strictly, again: Hydra's ``+key=value`` may have added keys the schema does not know; then the numbers."""
    try:
        OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(cfg, resolve=False))
    except Exception as exc:
        raise ConfigError(f"config does not match the schema: {exc}") from None
    for key, least in AT_LEAST.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < least:
            raise ConfigError(f"{key}={value}: must be at least {least}")


def prepare(cfg: DictConfig, load_models: bool = True, check_files: bool = True) -> Parts:
    """Every component of ``cfg`` built and checked; with ``load_models`` the models with their weights,
    with ``check_files`` the shards and weight files must exist now (a dry run may describe another machine's)."""
    check_schema(cfg)
    try:
        prec = precision(cfg.precision)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if prec.mixed and not prec.loss_scaling and cfg.deepspeed.zero_stage == 0:  # fp16 at ZeRO-0: see below
        raise ConfigError(
            f"precision={cfg.precision} with deepspeed.zero_stage=0 is not supported yet: the EMA and the "
            "weight reads for export see the bf16 weights there, not DeepSpeed's fp32 master copies; use "
            "deepspeed.zero_stage=1 or more (on one GPU ZeRO-1 costs the same memory as ZeRO-0)"
        )  # fp16 at ZeRO-0 gets DeepSpeed's FP16_Optimizer, with fp32 master weights and the dynamic loss scale
    Diffusion.from_node(cfg.diffusion)
    parts = Parts(
        cfg,
        build(cfg.task, "task", Task),
        build(cfg.data, "data", DataSource),
        build(cfg.optim, "optim", Optimizer),
        build(cfg.lr_schedule, "lr_schedule", LRSchedule),
        build(cfg.logger, "logger", Logger),
        prec,
        {},
    )
    parts.task.check(cfg, check_files)
    if check_files:
        try:
            parts.data.check()
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"data.urls: {exc}") from None
        if cfg.eval.every:
            try:
                check_eval(cfg.eval)
            except (FileNotFoundError, ValueError) as exc:
                raise ConfigError(str(exc)) from None
    if load_models:
        parts.models = parts.task.build_models(cfg)
    return parts


def plan(cfg: DictConfig) -> dict:
    """What ``dry_run=true`` prints: parameters, FLOPs per sample, ZeRO memory, and the job at this config's
    batch, ZeRO stage and ``plan.world_size`` ranks: memory per rank and step time on ``plan.gpu``."""
    from .plan import job_plan, plan_for

    world = cfg.plan.world_size or D.detect().world_size
    out = plan_for(cfg.unet, cfg.autoencoder, cfg.text_encoder, cfg.data.resolution, world, cfg.precision)
    return out | {"job": job_plan(out, cfg, world)}


def train(cfg: DictConfig) -> int:
    """Train; returns the exit code (0 also after a stop signal: see engine/guards.py)."""
    seed_everything(cfg.seed)  # the same initial weights on every rank (frozen modules are not broadcast)
    parts = prepare(cfg, load_models=not cfg.dry_run, check_files=not cfg.dry_run)
    if cfg.dry_run:
        print(json.dumps(plan(cfg), indent=2))
        return 0
    run = Run(parts)
    run.resume()
    run.loop()
    return run.finish()


class Run:
    """A running job: process group, engines, data stream, EMA, checkpoints, logger, guards."""

    def __init__(self, parts: Parts):
        cfg = self.cfg = parts.cfg
        self.env = env = D.detect()
        self.device = D.pick_device(cfg.device, env)
        try:
            parts.precision.check_device(self.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        D.init(env, self.device)
        self.run_dir, self.ckpt_dir = Path(cfg.run_dir), Path(cfg.checkpoint.dir)
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        print(f"[ldm] rank {env.rank}/{env.world_size} on node {node} (local rank {env.local_rank}, "
              f"{env.launcher}, {self.device})", flush=True)  # fmt: skip
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        seed_everything(cfg.seed * 1000 + env.rank)  # each rank's own noise and dropout from here on
        self.lock = FolderLock(self.run_dir, "ldm-train run") if env.is_main else None
        if env.is_main:
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
            atomic_write(self.run_dir / "config.yaml", self.config_yaml)
        self.task, self.lr_schedule, self.logger, self.precision = (
            parts.task,
            parts.lr_schedule,
            parts.logger,
            parts.precision,
        )
        self.base_lr = parts.optim.config.lr
        self.loader = parts.data.loader(env.rank, env.world_size)
        ctx = TaskContext(
            cfg, self.device, env.rank, env.world_size, parts.precision, parts.optim, parts.data
        )
        self.task.setup(ctx, parts.models)
        self.task.save_frozen(self.ckpt_dir / "frozen", write=env.is_main)
        self.ema = None
        if cfg.ema.enabled:  # each rank: the EMA of the fp32 fragments it owns
            self.ema = ShardedEMA(cfg.ema.decay, env.rank, env.world_size, cfg.ema.on_cpu)
            self.ema.attach(self.task.ema_module(), initialize=True)
        self.ckpt = Checkpointer(
            self.ckpt_dir, cfg.checkpoint.keep_last, env.rank, env.world_size, self.device
        )
        self.guard = NonFiniteGuard(cfg.guard.max_consecutive_bad, cfg.guard.max_rollbacks)
        self.stop = StopSignal()
        self.faults = Faults(cfg.faults, self.run_dir, env.rank, env.world_size)
        self.state = {"step": 0, "samples_seen": 0, "wandb_id": "", "nonfinite_steps": 0, "rollbacks": 0}
        self.info = {
            "git_commit": git_commit(Path(__file__).parent),
            **OmegaConf.to_container(cfg, resolve=True),
        }
        self.saved_at, self.stopped_by_signal = 0, False
        self.eval_prompts = eval_prompts(cfg.eval)
        self.eval_metrics = eval_metrics(cfg.eval, self.device) if cfg.eval.every else None

    # -- resume ------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from ``checkpoint.resume`` (the latest committed checkpoint by default), then log."""
        cfg, env, state = self.cfg, self.env, self.state
        resume_from = resolve_resume(cfg.checkpoint.resume, self.ckpt_dir)
        if resume_from is not None:
            state.update(self._load(resume_from, restore_data=True))
        state["wandb_id"] = (
            state["wandb_id"] or os.environ.get("LDM_WANDB_RUN_ID") or (new_run_id() if env.is_main else "")
        )
        self.guard.total, self.guard.rollbacks = state["nonfinite_steps"], state["rollbacks"]
        self.saved_at = state["step"]
        if env.is_main:
            self.logger.start(self.run_dir, state["wandb_id"], self.info, resume_from is not None)
        if resume_from is not None:
            self.logger.event("resumed_from", checkpoint=str(resume_from), step=state["step"])

    def _load(self, folder: Path, restore_data: bool) -> dict:
        engines, generators = self.task.engines(), self.task.generators()
        module = self.task.ema_module()
        return self.ckpt.load(folder, engines, self.loader, generators, self.ema, module, restore_data)

    # -- the loop ----------------------------------------------------------------------------------------
    def loop(self) -> None:
        cfg, state = self.cfg, self.state
        data = iter(self.loader)
        bar = progress(total=cfg.max_steps, initial=state["step"], desc=f"train {type(self.task).__name__}",
                       unit="step", disable=not (self.env.is_main and self.logger.config.progress))  # fmt: skip
        while state["step"] < cfg.max_steps:
            stopping = self.train_step(data, bar)
            bar.update(1)
            if stopping:
                self.stopped()
                return
        bar.close()

    def train_step(self, data, bar) -> bool:
        """One optimizer step (``grad_accum`` micro-batches), then EMA, logs, samples and checkpoints.
        Returns whether a stop signal was received on any rank (a checkpoint has then been written)."""
        cfg, task, state = self.cfg, self.task, self.state
        step, t0 = state["step"], time.perf_counter()
        factor = self.lr_schedule.factor(step, cfg.max_steps)
        task.set_lr_factor(factor)
        wait, losses, applied = 0.0, [], True
        for _ in range(cfg.deepspeed.grad_accum):
            tw = time.perf_counter()
            batch = next(data)
            wait += time.perf_counter() - tw
            self.faults.record_keys(step, batch)
            losses.append(task.forward_backward(batch, step, self.faults.perturb))
            applied = task.optimizer_step()
        state["step"] = step = step + 1
        state["samples_seen"] += cfg.data.batch_size * cfg.deepspeed.grad_accum * self.env.world_size
        if self.guard.record(applied):
            self.rollback(step)
        elif applied and self.ema is not None and step % cfg.ema.every == 0:
            self.ema.update()
        if step % self.logger.config.log_every == 0 or step == cfg.max_steps:
            metrics = self.metrics(losses, factor, time.perf_counter() - t0, wait, applied)
            self.logger.log(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if cfg.eval.every and step % cfg.eval.every == 0:
            self.sample_grid(step)
        stopping = D.any_rank(self.stop.received is not None)  # host-side: no device sync
        due = step % cfg.checkpoint.every == 0 or (step == cfg.max_steps and cfg.checkpoint.save_final)
        if (stopping or due) and self.guard.in_streak:  # never save what a non-finite streak left behind
            self.logger.event("checkpoint_skipped", step=step, reason="non-finite streak")
        elif stopping or due:
            self.save(step)
        self.faults.pause_after_step(step)
        return stopping

    def rollback(self, step: int) -> None:
        target = resolve_resume("auto", self.ckpt_dir)
        if target is None:
            raise RuntimeError(
                f"{self.guard.consecutive} non-finite steps in a row and no checkpoint to roll back to"
            )
        self._load(target, restore_data=False)
        self.guard.rolled_back(step)
        self.logger.event("rollback", step=step, to=str(target), nonfinite_steps=self.guard.total)

    def metrics(self, losses: list, factor: float, step_time: float, wait: float, applied: bool) -> dict:
        """The logged scalars: the loss averaged over ranks, throughput, data counters summed over ranks."""
        world, per_step = self.env.world_size, self.cfg.data.batch_size * self.cfg.deepspeed.grad_accum
        loss = torch.stack(losses).float().mean().item()
        counters = self.loader.counters()
        sums = D.all_reduce_sum(
            [loss, step_time, wait, float(counters["seen"]), float(counters["valid"])]
            + [float(counters["skipped"].get(r, 0)) for r in REASONS],
            self.device,
        )
        metrics = {
            "loss": sums[0] / world,
            "lr": self.base_lr * factor,
            "step_time": step_time,
            "samples_seen": self.state["samples_seen"],
            "images_per_s_rank": per_step / step_time,
            "images_per_s": per_step * world / step_time,
            "data_wait_fraction": sums[2] / max(sums[1], 1e-9),
            "loss_rank0": loss,
            "memory_mb": memory_mb(self.device),
            "nonfinite_steps": self.guard.total,
            "rollbacks": self.guard.rollbacks,
            "epoch": self.loader.epoch,
            "data/seen": sums[3],
            "data/valid": sums[4],
            "step_applied": int(applied),
        }
        norm = grad_norm(self.task.engines()["model"])
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        metrics |= {f"data/skipped_{r}": v for r, v in zip(REASONS, sums[5:], strict=True) if v}
        return metrics | {k: float(v) for k, v in self.task.metrics().items()}

    def sampling_weights(self) -> dict[str, torch.Tensor]:
        """The full weights to sample with on every rank: the EMA (one all-reduce), else the raw fp32 weights."""
        if self.ema is not None:
            return self.ema.full()
        module, zero = self.task.ema_module(), self.cfg.deepspeed.zero_stage
        return dict(full_fp32_params(module, zero, self.precision.mixed))

    def sample_grid(self, step: int) -> None:
        """Every ``eval.every`` steps, with the EMA weights: the prompt set's metrics across the ranks (when
        ``eval.*`` asks for any) and a sample grid, logged."""
        e = self.cfg.eval
        weights = self.sampling_weights()
        pipeline = self.task.sampling_pipeline(weights) if self.eval_metrics is not None else None
        if pipeline is not None:  # every rank samples its share of the prompts
            seeds = [e.seed + i for i in range(len(self.eval_prompts))]
            opts = GenerateOptions(steps=e.steps, guidance=e.guidance)
            result = evaluate_prompts(pipeline, self.eval_prompts, seeds, opts, self.eval_metrics, step,
                                      self.run_dir / "eval", self.env.rank, self.env.world_size)  # fmt: skip
            if self.env.is_main:
                self.logger.log(step, {f"eval/{k}": v for k, v in result.items()})
                grid = result_paths(self.run_dir / "eval", step)[1]
                if grid.is_file():
                    self.logger.image(step, "samples", Image.open(grid), " | ".join(self.eval_prompts[:16]))
            return
        if not self.env.is_main:
            return
        images, caption = self.task.samples(self.eval_prompts, e.steps, e.guidance, weights)
        if images is not None:
            self.logger.image(step, "samples", grid_image(images), caption)

    def save(self, step: int) -> None:
        trainer_state = {
            **self.state,
            "world_size": self.env.world_size,
            "nonfinite_steps": self.guard.total,
            "rollbacks": self.guard.rollbacks,
            "ema_updates": self.ema.updates if self.ema else 0,
            "task": self.cfg.task._target_,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "precision": self.precision.name,
            "git_commit": self.info["git_commit"],
        }
        engines, generators = self.task.engines(), self.task.generators()
        self.ckpt.save(step, engines, self.loader, generators, self.ema, trainer_state, self.config_yaml,
                       self.faults.pause_in_save(step))  # fmt: skip
        self.saved_at = step
        self.logger.event("checkpoint", step=step, path=str(self.ckpt_dir / tag_for(step)))

    # -- the end -----------------------------------------------------------------------------------------
    def stopped(self) -> None:
        """After a stop signal: the checkpoint is committed; leave the requeue marker and exit cleanly."""
        step = self.state["step"]
        self.logger.event("preempted", step=step, signal=self.stop.received)
        self.logger.finish()
        if self.env.is_main:
            atomic_write(self.run_dir / PREEMPTED_MARKER, f"{step}\n")
        D.barrier()
        print(f"[ldm] stopped by signal {self.stop.received} after step {step}; checkpoint committed; rerun "
              "the same command to resume", flush=True)  # fmt: skip
        self.stopped_by_signal = True

    def finish(self) -> int:
        self.faults.close()
        if self.stopped_by_signal:
            return 0
        if self.cfg.faults.dump_weights:
            module, mixed = self.task.ema_module(), self.precision.mixed
            full = {
                n: t.cpu().contiguous()
                for n, t in full_fp32_params(module, self.cfg.deepspeed.zero_stage, mixed)
            }
            if self.env.is_main:
                atomic_save(self.run_dir / "final_weights.safetensors", lambda tmp: save_file(full, str(tmp)))
        self.logger.event("done", step=self.state["step"], last_checkpoint=self.saved_at)
        self.logger.finish()
        D.barrier()
        return 0


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
