"""The schemas of the entry points' configs (``conf/train.yaml``, ``conf/precompute.yaml``, ``conf/info.yaml``).

Hydra checks every key and type against these dataclasses at start. Fields typed ``Any`` hold a component
(``_target_`` + its fields): :func:`trainer.config.typed` checks them against the ``Config`` of the class they
name when the run is built, before anything expensive starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from data_pipeline.images import ImageShardsConfig

from .diffusion.objectives import DiffusionConfig


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    grad_accum: int = 1
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    extra: dict[str, Any] = field(default_factory=dict)  # deep-merged into the DeepSpeed config


@dataclass
class CheckpointConfig:
    dir: str = "${run_dir}/checkpoints"
    every: int = 1000  # steps
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in dir, if any) | none | a checkpoint folder
    save_final: bool = True


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    every: int = 1  # update every N steps
    on_cpu: bool = False  # keep each rank's fp32 EMA fragments in host memory


@dataclass
class PlanConfig:
    """What ``dry_run=true`` sizes the job for (see trainer/plan.py)."""

    gpu: str = "h100"  # peak dense bf16 TFLOP/s from trainer.plan.GPUS (a100, h100, h200, l40s, ...)
    mfu: float = 0.4  # model FLOPs utilization assumed for the step time
    world_size: int = 0  # ranks to plan for; 0: the launcher's (1 on a login node)


@dataclass
class EvalConfig:
    """What the run samples while it trains: a grid of fixed prompts, every ``every`` steps."""

    every: int = 0  # 0: never (autoencoder stage: reconstructions of fixed inputs)
    prompts: list[str] = field(default_factory=lambda: ["a red circle in the top left"])
    prompts_file: str = ""  # one prompt per line; replaces ``prompts``
    seed: int = 0  # prompt i is sampled with seed ``seed + i`` (the same images on any number of ranks)
    steps: int = 20
    guidance: float = 3.0
    # metrics on the prompt set, computed every ``every`` steps across the ranks (any of these turns them on)
    inception_weights: str = (
        ""  # FID Inception weights file (pt_inception-2015-12-05): features for FID/KID/PRC/IS
    )
    ref_stats: str = ""  # reference statistics from ``ldm-eval ref`` (FID; KID and precision/recall when it holds features)
    clip_weights: str = ""  # an OpenCLIP checkpoint for the CLIP score
    clip_model: str = "ViT-B-32"
    adherence: bool = False  # rule-based adherence, for prompts of the synthetic captioned-shapes set
    batch_size: int = 8


@dataclass
class GuardConfig:
    max_consecutive_bad: int = 3  # this many non-finite steps in a row roll back to the last checkpoint
    max_rollbacks: int = 3  # more rollbacks than this with no good step in between end the run (exit code 3)


@dataclass
class FaultConfig:
    """Fault injection and inspection for tests and drills (never set in real runs)."""

    nan_loss_at: list[int] = field(default_factory=list)  # steps whose loss is made NaN (on the last rank)
    inf_grad_at: list[int] = field(default_factory=list)  # steps whose gradients are made infinite
    pause_at: int = -1  # rank 0 writes <run_dir>/PAUSED and sleeps after this step (for SIGKILL tests)
    pause_in_save_at: int = -1  # ... after writing this step's shards, before committing `latest`
    log_keys: bool = False  # write each rank's sample keys per step to keys_rank<r>.jsonl
    dump_weights: bool = (
        False  # at the end, rank 0 writes the gathered fp32 weights (final_weights.safetensors)
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
    python: str = ""  # the interpreter on the compute nodes ("": the one that ran ldm-submit)
    workdir: str = ""  # where jobs run ("" = the folder ldm-submit ran in)
    setup: list[str] = field(default_factory=list)  # shell lines before launch (module load, ...)
    env: dict[str, str] = field(default_factory=dict)  # exported variables (NCCL_*, ...)
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH ..." options, e.g. --exclusive
    export_at_end: bool = True  # run ldm-export after a training job completes
    array_parallelism: int = 0  # a sweep's job array runs at most this many points at once (0: no limit)


@dataclass
class TrainConfig:
    run_name: str = "run"
    run_dir: str = "runs/${run_name}"
    seed: int = 0
    max_steps: int = 1000
    precision: str = "fp32"  # fp32 | bf16 | fp16 (dynamic loss scaling) | bf16-autocast (fp32 weights)
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda
    dry_run: bool = False  # print the plan (parameters, FLOPs, ZeRO memory) and exit
    task: Any = MISSING  # the stage: trainer.tasks.unet.UNetTask | trainer.tasks.autoencoder.AutoencoderTask
    data: Any = MISSING  # data_pipeline.images.ImageShards | data_pipeline.latents.LatentShards
    unet: Any = None
    autoencoder: Any = MISSING
    text_encoder: Any = None
    weights: ModelWeights = field(default_factory=ModelWeights)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: Any = MISSING  # trainer.engine.optim.AdamW | DeepSpeedAdamW
    lr_schedule: Any = MISSING  # trainer.engine.optim.ConstantLR | CosineLR
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: Any = MISSING  # trainer.engine.loggers.JsonlLogger | WandbLogger
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    launcher: SlurmConfig = field(default_factory=SlurmConfig)  # used by ldm-submit (conf/launcher)


@dataclass
class PrecomputeConfig:
    data: ImageShardsConfig = field(default_factory=ImageShardsConfig)
    autoencoder: Any = MISSING
    text_encoder: Any = None
    weights: ModelWeights = field(default_factory=ModelWeights)
    out: str = MISSING
    dtype: str = "fp16"  # fp16 | bf16
    flip: bool = False  # also store the latents of the horizontally flipped image
    store_text: bool = False  # also store the text encoder's tokens for every caption line
    batch_size: int = 16
    scale_samples: int = 1024
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    pause_after_shards: int = -1  # fault injection for tests: rank 0 pauses after this many shards
    run_name: str = "precompute"
    launcher: SlurmConfig = field(default_factory=SlurmConfig)  # used by ldm-submit


@dataclass
class InfoConfig:
    unet: Any = None
    autoencoder: Any = None
    text_encoder: Any = None
    resolution: int = 256
    world_size: int = 8
    precision: str = "bf16"


def register_schemas() -> None:
    """Make the schemas (the defaults lists' first entries) known to Hydra."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="precompute_schema", node=PrecomputeConfig)
    store.store(name="info_schema", node=InfoConfig)


register_schemas()
