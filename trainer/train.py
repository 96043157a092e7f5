"""``ldm-train``: train the autoencoder (``stage=autoencoder``) or the UNet (``stage=unet``) with DeepSpeed.

    ldm-train experiment=tiny_cpu                       # a one-minute CPU run on the synthetic shards
    torchrun --nproc_per_node 8 -m trainer.train experiment=sd2_base_256 data.urls=...
    ldm-train experiment=sd2_base_256 dry_run=true      # parameters, FLOPs, ZeRO memory; nothing runs
    ldm-train experiment=tiny_cpu --cfg job             # the resolved config

Everything is built from the Hydra config; the loop below is the whole training procedure.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import save_file
from tqdm import tqdm

from data_pipeline.errors import REASONS
from data_pipeline.loader import build_loader

from .build import build_models, fingerprint, validate
from .config import conf_dir
from .engine import distributed as D
from .engine.checkpoint import Checkpointer, resolve_resume
from .engine.deepspeed_setup import lr_at, set_lr
from .engine.deepspeed_setup import step as engine_step
from .engine.ema import EMA
from .engine.guards import PREEMPTED_MARKER, NonFiniteGuard, StopSignal, pause_forever
from .engine.loggers import RunLogger, git_commit, new_run_id
from .engine.rng import seed_everything
from .images import grid_image
from .tasks.autoencoder import AutoencoderTask
from .tasks.unet import UNetTask
from .train_config import register_schema  # noqa: F401  (registers train_schema with Hydra)

log = logging.getLogger("ldm.train")


def save_frozen(ckpt_dir: Path, models: dict, scale_factor: float) -> None:
    """The UNet stage's frozen modules, once per run: exports need the exact autoencoder and text encoder."""
    from dataclasses import asdict

    folder = ckpt_dir / "frozen"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"scale_factor": scale_factor}
    for name in ("autoencoder", "text_encoder"):
        module = models.get(name)
        if module is None or getattr(module, "trainable", False):
            continue
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
            str(folder / f".{name}.tmp"),
        )
        (folder / f".{name}.tmp").replace(folder / f"{name}.safetensors")
        meta[name] = asdict(module.config)
    (folder / "frozen.json").write_text(json.dumps(meta, indent=1))


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: DictConfig) -> int:
    validate(cfg, check_data=not cfg.dry_run, check_files=not cfg.dry_run)
    if cfg.dry_run:
        from .info import plan_for

        world = D.detect().world_size
        plan = plan_for(
            OmegaConf.create(
                {
                    "unet": cfg.unet,
                    "autoencoder": cfg.autoencoder,
                    "text_encoder": cfg.text_encoder,
                    "resolution": cfg.data.resolution,
                    "world_size": world,
                    "precision": cfg.precision,
                }
            )
        )
        print(json.dumps(plan, indent=2))
        return 0
    env = D.detect()
    device = D.pick_device(cfg.device, env)
    D.init(env, device)
    if env.is_main:
        (Path(cfg.run_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(
        f"[ldm] rank {env.rank}/{env.world_size} on node {node} (local rank {env.local_rank}, {env.launcher}, "
        f"{device})",
        flush=True,
    )
    run_dir, ckpt_dir = Path(cfg.run_dir), Path(cfg.checkpoint.dir)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    seed_everything(cfg.seed * 1000 + env.rank)
    models, scale = build_models(cfg)
    if cfg.data.kind == "latents":  # the shards must come from this autoencoder; their scale factor wins
        with open_dict(cfg):
            cfg.data.expect_autoencoder = cfg.data.expect_autoencoder or fingerprint(models["autoencoder"])
    loader = build_loader(cfg.data, env.rank, env.world_size)
    if cfg.data.kind == "latents":
        scale = float(loader.manifest["scale_factor"])
    task = (UNetTask if cfg.stage == "unet" else AutoencoderTask)(cfg, models, device, env.rank, scale)
    if env.is_main and cfg.stage == "unet":
        save_frozen(ckpt_dir, models, scale)
    ema = EMA(cfg.ema.decay, cfg.ema.device, env.is_main) if cfg.ema.enabled else None
    if ema is not None:
        ema.initialize(task.ema_module, cfg.deepspeed.zero_stage, cfg.precision)
    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint.keep_last, env.rank, env.world_size)
    generators = {"task": task.generator} if hasattr(task, "generator") else {}
    state = {"step": 0, "samples_seen": 0, "wandb_id": "", "nonfinite_steps": 0, "rollbacks": 0}
    resume_from = resolve_resume(cfg.checkpoint.resume, ckpt_dir)
    if resume_from is not None:
        state.update(ckpt.load(resume_from, task.engines, loader, generators, ema))
    state["wandb_id"] = (
        state["wandb_id"] or os.environ.get("LDM_WANDB_RUN_ID") or (new_run_id() if env.is_main else "")
    )
    info = {"git_commit": git_commit(Path(__file__).parent), **OmegaConf.to_container(cfg, resolve=True)}
    logger = RunLogger(cfg.logger, run_dir, state["wandb_id"], info, env.is_main, resume_from is not None)
    if resume_from is not None:
        logger.event("resumed_from", checkpoint=str(resume_from), step=state["step"])
    guard = NonFiniteGuard(cfg.guard.max_consecutive_bad)
    guard.total, guard.rollbacks = state["nonfinite_steps"], state["rollbacks"]
    stop = StopSignal()

    def trainer_state() -> dict:
        return {
            **state,
            "world_size": env.world_size,
            "nonfinite_steps": guard.total,
            "rollbacks": guard.rollbacks,
            "ema_updates": ema.updates if ema else 0,
            "stage": cfg.stage,
            "zero_stage": cfg.deepspeed.zero_stage,
            "precision": cfg.precision,
            "git_commit": info["git_commit"],
        }

    def save(step: int) -> None:
        pause = (
            (lambda: pause_forever(run_dir, f"save {step}")) if step == cfg.faults.pause_in_save_at else None
        )
        if pause is not None and not env.is_main:
            pause = None
        ckpt.save(step, task.engines, loader, generators, ema, trainer_state(), config_yaml, pause)
        logger.event("checkpoint", step=step)

    accum, world = cfg.deepspeed.grad_accum, env.world_size
    per_step = cfg.data.batch_size * accum
    data = iter(loader)
    bar = tqdm(
        total=cfg.max_steps,
        initial=state["step"],
        disable=not (env.is_main and cfg.logger.progress),
        desc=f"train {cfg.stage}",
        dynamic_ncols=True,
    )
    keys_log = open(run_dir / f"keys_rank{env.rank}.jsonl", "a", buffering=1) if cfg.faults.log_keys else None
    saved_at = state["step"]
    while state["step"] < cfg.max_steps:
        step = state["step"]
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim, cfg.max_steps)
        for name, engine in task.engines.items():
            set_lr(
                engine,
                lr if name == "model" else lr_at(step, cfg.optim, cfg.max_steps, cfg.optim.disc_lr or None),
            )
        wait, losses, applied = 0.0, [], True
        for _ in range(accum):
            tw = time.perf_counter()
            batch = next(data)
            wait += time.perf_counter() - tw
            if keys_log is not None:
                keys_log.write(
                    json.dumps({"step": step, "keys": batch["key"], "epoch": batch["epoch"].tolist()}) + "\n"
                )
            losses.append(task.forward_backward(batch, step, cfg.faults))
            applied = engine_step(task.engine)
            if getattr(task, "disc_active", False):
                engine_step(task.disc)
        state["step"] = step = step + 1
        state["samples_seen"] += per_step * world
        rollback = guard.record(applied)
        if applied and ema is not None and step % cfg.ema.every == 0:
            ema.update(task.ema_module, cfg.deepspeed.zero_stage, cfg.precision)
        if rollback:
            target = resolve_resume("auto", ckpt_dir)
            if target is None:
                raise RuntimeError(
                    f"{guard.consecutive} non-finite steps in a row and no checkpoint to roll back to"
                )
            ckpt.load(target, task.engines, loader, generators, ema, restore_data=False)
            guard.rolled_back()
            logger.event("rollback", step=step, to=str(target), nonfinite_steps=guard.total)
        step_time = time.perf_counter() - t0
        if step % cfg.logger.log_every == 0 or step == cfg.max_steps:
            loss = torch.stack(losses).float().mean().item()
            counters = loader.counters()
            sums = D.all_reduce_sum(
                [loss, step_time, wait, float(counters["seen"]), float(counters["valid"])]
                + [float(counters["skipped"].get(r, 0)) for r in REASONS],
                device,
            )
            metrics = {
                "loss": sums[0] / world,
                "lr": lr,
                "step_time": step_time,
                "samples_seen": state["samples_seen"],
                "images_per_s_rank": per_step / step_time,
                "images_per_s": per_step * world / step_time,
                "data_wait_fraction": sums[2] / max(sums[1], 1e-9),
                "loss_rank0": loss,
                "memory_mb": memory_mb(device),
                "nonfinite_steps": guard.total,
                "rollbacks": guard.rollbacks,
                "epoch": loader.epoch,
                "data/seen": sums[3],
                "data/valid": sums[4],
                "step_applied": int(applied),
            }
            norm = task.engine.get_global_grad_norm()  # None where DeepSpeed computes none (ZeRO-0 in fp32)
            if norm is not None:
                metrics["grad_norm"] = float(norm)
            metrics |= {f"data/skipped_{r}": v for r, v in zip(REASONS, sums[5:], strict=True) if v}
            metrics |= {f"ae/{k}": v for k, v in getattr(task, "last_logs", {}).items()}
            logger.log(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        if cfg.logger.sample_every and step % cfg.logger.sample_every == 0:
            images, caption = task.samples(cfg.logger)
            if images is not None and env.is_main:
                logger.image(step, "samples", grid_image(images), caption)
        stopping = D.all_reduce_max(float(stop.received is not None), device) > 0
        if (
            step % cfg.checkpoint.every == 0
            or stopping
            or (step == cfg.max_steps and cfg.checkpoint.save_final)
        ):
            save(step)
            saved_at = step
        if step == cfg.faults.pause_at and env.is_main:
            pause_forever(run_dir, f"step {step}")
        if stopping:
            logger.event("preempted", step=step, signal=stop.received)
            logger.finish()
            if env.is_main:
                (run_dir / PREEMPTED_MARKER).write_text(f"{step}\n")
            D.barrier()
            print(
                f"[ldm] stopped by signal {stop.received} after step {step}; checkpoint committed; rerun the same "
                "command to resume",
                flush=True,
            )
            return 0
    bar.close()
    if keys_log is not None:
        keys_log.close()
    if cfg.faults.dump_weights:
        from .engine.ema import full_fp32_params

        full = {
            n: t.cpu().contiguous()
            for n, t in full_fp32_params(task.ema_module, cfg.deepspeed.zero_stage, cfg.precision)
        }
        if env.is_main:
            save_file(full, str(run_dir / "final_weights.safetensors"))
    logger.event("done", step=state["step"], last_checkpoint=saved_at)
    logger.finish()
    D.barrier()
    return 0


_exit_code = 0


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    global _exit_code
    _exit_code = train(cfg)


def main() -> None:
    """Console entry point (after a stop signal: exit 0 and <run_dir>/PREEMPTED, see engine/guards.py)."""
    _hydra_main()
    sys.exit(_exit_code)


if __name__ == "__main__":
    main()
