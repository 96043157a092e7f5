"""The schema of ``ldm-train``'s config (``conf/train.yaml`` and its groups). Hydra checks every key and type
against these dataclasses at start; component groups (unet, autoencoder, text_encoder) are checked against the
schema of their ``_target_`` by :func:`trainer.config.typed`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from data_pipeline.config import DataConfig

from .diffusion.objectives import DiffusionConfig
from .models.ae_loss import AutoencoderLossConfig


@dataclass
class OptimConfig:
    name: str = (
        "adamw"  # adamw (torch.optim.AdamW: bit-exact resume) | ds_adamw (DeepSpeed FusedAdam / CPUAdam)
    )
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    disc_lr: float = 0.0  # autoencoder stage: the discriminator's learning rate (0: same as lr)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    grad_accum: int = 1
    modules: list[str] = field(default_factory=lambda: ["unet"])  # what the engine wraps (and ZeRO shards)
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed config as is


@dataclass
class CheckpointConfig:
    dir: str = "${run_dir}/checkpoints"
    every: int = 1000  # steps
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in dir, if any) | none | a checkpoint folder
    save_final: bool = True


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | jsonl (metrics.jsonl is always written on rank 0)
    project: str = "ldm"
    entity: str = ""
    mode: str = "offline"  # online | offline | disabled
    name: str = ""
    tags: list[str] = field(default_factory=list)
    log_every: int = 10
    progress: bool = True  # tqdm bar on rank 0
    sample_every: int = 0  # 0: never (a sample grid of fixed prompts; autoencoder: reconstructions)
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle in the top left"])
    sample_steps: int = 20
    sample_guidance: float = 3.0


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    every: int = 1  # update every N steps (gathering parameters under ZeRO-3 costs an all-gather)
    device: str = "same"  # same | cpu  (where rank 0 keeps the fp32 EMA copy)


@dataclass
class GuardConfig:
    max_consecutive_bad: int = 3  # this many non-finite steps in a row roll back to the last checkpoint


@dataclass
class FaultConfig:
    """Fault injection and inspection for tests and drills (never set in real runs)."""

    nan_loss_at: list[int] = field(default_factory=list)  # steps whose loss is made NaN (on the last rank)
    inf_grad_at: list[int] = field(default_factory=list)  # steps whose gradients are made infinite
    pause_at: int = -1  # rank 0 writes <run_dir>/PAUSED and sleeps after this step (for SIGKILL tests)
    pause_in_save_at: int = -1  # ... after writing this step's shards, before committing `latest`
    log_keys: bool = False  # write each rank's sample keys per step to keys_rank<r>.jsonl
    dump_weights: bool = (
        False  # at the end, rank 0 writes the engine's gathered fp32 weights (final_weights.safetensors)
    )


@dataclass
class ModelWeights:
    unet: str = ""  # initial UNet weights: SD single file, diffusers folder, or our export ("" = random init)
    autoencoder: str = (
        ""  # the frozen autoencoder (UNet stage): our export, SD single file or diffusers folder
    )
    allow_random_autoencoder: bool = False  # tests only: train the UNet on a randomly initialised autoencoder


@dataclass
class SlurmConfig:
    """How ``ldm-submit`` renders the sbatch script (conf/launcher/)."""

    job_name: str = "ldm"
    nodes: int = 1
    gpus_per_node: int = 8  # 0 on CPU clusters
    tasks_per_node: int = 0  # 0: one per GPU (srun launch) or 1 (torchrun launch)
    cpus_per_task: int = 8
    mem: str = ""  # e.g. 0 (all of the node) or 400G; "" leaves Slurm's default
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    launch: str = "srun"  # srun (one task per GPU) | torchrun (one torchrun per node)
    signal_grace: int = 300  # USR1 this many seconds before the time limit: checkpoint and requeue
    requeue: bool = True
    max_requeues: int = 20
    min_runtime: int = 120  # a stop signal sooner than this after a (re)start is ignored (no requeue loops)
    python: str = "python"  # the interpreter on the compute nodes
    workdir: str = ""  # where jobs run ("" = the folder ldm-submit ran in)
    setup: list[str] = field(
        default_factory=list
    )  # shell lines before launch (module load, source .venv/...)
    env: dict[str, str] = field(default_factory=dict)  # exported variables (NCCL_*, ...)
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH ..." options, e.g. --exclusive
    export_at_end: bool = True  # run ldm-export after a training job completes


@dataclass
class TrainConfig:
    stage: str = "unet"  # unet | autoencoder
    run_name: str = "run"
    run_dir: str = "runs/${run_name}"
    seed: int = 0
    max_steps: int = 1000
    precision: str = "fp32"  # fp32 | bf16
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda
    dry_run: bool = False  # print the plan (parameters, FLOPs, ZeRO memory) and exit
    concat: str = "none"  # none | inpaint | superres: extra UNet input channels
    posterior: str = "sample"  # sample | mean: which latent of the autoencoder's posterior the UNet learns
    data: DataConfig = field(default_factory=DataConfig)
    unet: Any = MISSING
    autoencoder: Any = MISSING
    text_encoder: Any = None
    weights: ModelWeights = field(default_factory=ModelWeights)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    launcher: SlurmConfig = field(default_factory=SlurmConfig)  # used by ldm-submit (conf/launcher)


def register_schema() -> None:
    """Make ``train_schema`` (the defaults list's first entry) known to Hydra."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_schema()
