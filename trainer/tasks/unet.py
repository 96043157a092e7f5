"""The UNet stage (``task=unet``): latents from the frozen autoencoder (encoded on the fly from images, or read
from latent shards), conditions from the condition encoder (text, class labels, layouts, none) and the concat
condition (inpainting, super-resolution, semantic maps), the diffusion objective on the UNet inside DeepSpeed.

The latent scale factor comes from the data (latent shards record the one ``ldm-precompute`` measured), else
from the autoencoder's weights when they record one (a diffusers VAE's ``scaling_factor``, our export), else
from ``autoencoder.scale_factor`` when it is set (> 0), else from the run's own ``frozen.json`` when it resumes,
else it is measured here as precompute does: 1 / std of posterior samples of the first ``task.scale_samples``
training images, on rank 0, and sent to every rank."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from data_pipeline.atomic import atomic_json, atomic_save

from ..config import ConfigError, build, config_dict, to_dataclass
from ..diffusion.objectives import Diffusion, DiffusionObjective
from ..engine import distributed as D
from ..engine.deepspeed_setup import loss_scale, make_engine, set_lr
from ..engine.deepspeed_setup import step as engine_step
from ..inference.pipeline import GenerateOptions, LatentDiffusionPipeline
from ..models.autoencoder import Autoencoder, measure_scale_factor
from ..models.text_encoders import ConditionEncoder
from ..models.unet import UNetModel
from ..models.weights import load_autoencoder_weights, load_unet_weights
from .base import TaskContext
from .common import check_zero_stage, images_to_model, with_weights
from .concat import ConcatCondition

log = logging.getLogger(__name__)


@dataclass
class UNetTaskConfig:
    _target_: str = "trainer.tasks.unet.UNetTask"
    sample_posterior: bool = True  # learn posterior samples (LDM) rather than the posterior means
    concat: Any = (
        None  # extra input channels: trainer.tasks.concat.InpaintConcat | SuperResConcat | SemanticConcat
    )
    scale_samples: int = 1024  # images the latent scale factor is measured on (when nothing records it)


class DiffusionModel(nn.Module):
    """What the engine wraps: the UNet and, when it is trained too, the condition encoder."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        if text_encoder is not None:
            self.text_encoder = text_encoder

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context=None, labels=None, conditions: list | None = None
    ):
        """``conditions`` (raw, for a trained encoder) or ``context`` tokens (and ``labels``); the labels reach
        the UNet's label embedding when it has one (``unet.num_classes``)."""
        if conditions is not None:
            out = self.text_encoder(conditions)
            context, labels = out.tokens, out.labels
        y = labels if self.unet.config.num_classes > 0 else None
        return self.unet(x, t, context.to(x.dtype), y)


class UNetTask:
    """Denoising in the latent space of a frozen autoencoder, conditioned by cross-attention (and concat)."""

    Config = UNetTaskConfig

    def __init__(self, config: UNetTaskConfig | None = None):
        self.config = config or UNetTaskConfig()
        self.concat: ConcatCondition | None = (
            build(self.config.concat, "task.concat", ConcatCondition) if self.config.concat else None
        )

    # -- before anything runs ----------------------------------------------------------------------------
    def check(self, cfg, files: bool = True) -> None:
        check_zero_stage(cfg)
        ae = to_dataclass(cfg.autoencoder, "autoencoder", Autoencoder)
        if cfg.unet is None:
            raise ConfigError("unet: the UNet stage needs a unet config (unet=...)")
        unet = to_dataclass(cfg.unet, "unet", UNetModel)
        total = ae.downsampling * unet.downsampling
        if cfg.data.resolution % total:
            raise ConfigError(
                f"data.resolution={cfg.data.resolution} is not divisible by the autoencoder's f="
                f"{ae.downsampling} times the UNet's downsampling {unet.downsampling} (= {total})"
            )
        extra = self.concat.channels(ae.embed_dim) if self.concat else 0
        if unet.in_channels != ae.embed_dim + extra:
            raise ConfigError(
                f"unet.in_channels={unet.in_channels} but the autoencoder's latents have {ae.embed_dim} "
                f"channels (+{extra} from task.concat)"
            )
        if cfg.text_encoder is None:
            raise ConfigError("text_encoder: the UNet stage needs a condition encoder (text_encoder=...)")
        to_dataclass(cfg.text_encoder, "text_encoder", ConditionEncoder)
        w = cfg.weights
        if not files:
            return
        if not w.autoencoder and not w.allow_random_autoencoder:
            raise ConfigError(
                "weights.autoencoder is empty: the UNet stage needs trained autoencoder weights "
                "(our export, an SD checkpoint or a diffusers folder)"
            )
        for key in ("autoencoder", "unet"):
            path = getattr(w, key)
            if path and not Path(path).exists():
                raise ConfigError(f"weights.{key}: {path!r} does not exist")

    def build_models(self, cfg) -> dict[str, nn.Module]:
        autoencoder = build(cfg.autoencoder, "autoencoder", Autoencoder)
        self.recorded_scale = autoencoder.config.scale_factor or None  # 0: not known, measure it
        if cfg.weights.autoencoder:
            self.recorded_scale = (
                load_autoencoder_weights(autoencoder, cfg.weights.autoencoder) or self.recorded_scale
            )
        else:
            log.warning("weights.allow_random_autoencoder: training on a randomly initialised autoencoder")
        text_encoder = build(cfg.text_encoder, "text_encoder", ConditionEncoder)
        unet = build(cfg.unet, "unet", UNetModel)
        if unet.config.context_dim != text_encoder.context_dim:
            raise ConfigError(
                f"unet.context_dim={unet.config.context_dim} but the text encoder gives "
                f"{text_encoder.context_dim}-dim tokens"
            )
        if unet.config.num_classes and unet.config.num_classes != text_encoder.num_labels:
            raise ConfigError(
                f"unet.num_classes={unet.config.num_classes} but the condition encoder gives "
                f"{text_encoder.num_labels} class labels (text_encoder=class with num_classes="
                f"{unet.config.num_classes - 1}: the last label is its null class)"
            )
        if cfg.weights.unet:
            load_unet_weights(unet, cfg.weights.unet)
        return {"autoencoder": autoencoder, "text_encoder": text_encoder, "unet": unet}

    # -- set up ------------------------------------------------------------------------------------------
    def setup(self, ctx: TaskContext, models: dict[str, nn.Module]) -> None:
        from ..models.weights import fingerprint

        cfg, device = ctx.cfg, ctx.device
        self.cfg, self.device, self.rank, self.world = cfg, device, ctx.rank, ctx.world_size
        self.dtype, self.precision = ctx.precision.dtype, ctx.precision
        have = ctx.data.batch_keys()
        needs = {
            "task.concat": self.concat.needs() if self.concat is not None else frozenset(),
            "text_encoder": models["text_encoder"].batch_keys(),
        }
        for key, keys in needs.items():
            if keys - have:
                raise ConfigError(
                    f"{key} needs {sorted(keys - have)} in each batch but the data gives {sorted(have)}: "
                    "train it from image shards that hold them (data.fields, data.maps)"
                )
        self.autoencoder = models["autoencoder"].to(device).eval().requires_grad_(False)
        self.fingerprints = {"autoencoder": fingerprint(self.autoencoder)}
        ctx.data.check_autoencoder(self.fingerprints["autoencoder"])
        self._generator = torch.Generator(device).manual_seed(cfg.seed * 1000 + ctx.rank)
        self.scale_factor = (
            ctx.data.scale_factor() or self.recorded_scale or self.run_scale(cfg) or self.measure_scale(ctx)
        )
        self.stored_latents = "latent_mean" in have
        self.text_encoder = models["text_encoder"].to(device)
        self.train_text = bool(self.text_encoder.trainable)
        if not self.train_text:
            self.fingerprints["text_encoder"] = fingerprint(self.text_encoder)
        module = DiffusionModel(models["unet"], self.text_encoder if self.train_text else None).to(device)
        self.lr = ctx.optim.config.lr
        self.engine = make_engine(
            module, cfg.deepspeed, ctx.optim, cfg.data.batch_size, ctx.precision, self.lr
        )
        if ctx.precision.mixed:
            self.autoencoder.to(self.dtype)
            if not self.train_text:
                self.text_encoder.to(self.dtype)
        self.diffusion = Diffusion.from_node(cfg.diffusion)
        self.objective = DiffusionObjective(self.diffusion)
        self._losses: list[torch.Tensor] = []  # this step's micro-batch losses (fp16 overflow vs. non-finite)

    @staticmethod
    def run_scale(cfg) -> float | None:
        """The scale factor a resumed (or reused) run measured when it began (its ``frozen.json``): measured
        again it could differ in the last bits, and the run must keep the scale it trained with."""
        meta_file = Path(cfg.checkpoint.dir) / "frozen" / "frozen.json"
        if not meta_file.is_file():
            return None
        return json.loads(meta_file.read_text()).get("scale_factor") or None

    def measure_scale(self, ctx: TaskContext) -> float:
        """1 / std of posterior samples of the first ``scale_samples`` images (rank 0's own reading of the data,
        separate from the training stream), the same on every rank."""
        value = 0.0
        if ctx.rank == 0:
            loader = ctx.data.loader(0, 1)
            g = torch.Generator(ctx.device).manual_seed(ctx.cfg.seed)
            images = (images_to_model(b["image"], ctx.device, torch.float32, False) for b in loader)
            value = measure_scale_factor(self.autoencoder, images, self.config.scale_samples, g)
            log.info("latent scale factor measured on %d images: %.5f", self.config.scale_samples, value)
        return D.all_reduce_sum([value], ctx.device)[0]

    def engines(self) -> dict:
        return {"model": self.engine}

    def generators(self) -> dict[str, torch.Generator]:
        return {"task": self._generator}

    def ema_module(self) -> nn.Module:
        return self.engine.module

    # -- a step --------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> scaled latents (posterior means)."""
        return self.autoencoder.encode_latents(images.to(self.dtype)).float() * self.scale_factor

    def latents(self, batch: dict, images: torch.Tensor | None) -> torch.Tensor:
        sample = self.config.sample_posterior
        if self.stored_latents:  # precomputed latent shards: a fresh posterior sample every time
            mean = batch["latent_mean"].to(self.device, torch.float32)
            if not sample:
                return mean * self.scale_factor
            std = batch["latent_std"].to(self.device, torch.float32)
            noise = torch.randn(mean.shape, generator=self._generator, device=self.device)
            return (mean + std * noise) * self.scale_factor
        with torch.no_grad():
            z = self.autoencoder.encode_latents(images, sample=sample, generator=self._generator)
        return z.float() * self.scale_factor

    def forward_backward(self, batch: dict, step: int, perturb) -> torch.Tensor:
        images = None
        if "image" in batch:
            images = images_to_model(batch["image"], self.device, self.dtype, self.cfg.channels_last)
        latents = self.latents(batch, images)
        conds = self.text_encoder.conditions(batch)
        context = labels = None
        if "text_tokens" in batch and not self.train_text:  # stored by ldm-precompute
            context = batch["text_tokens"].to(self.device, self.dtype)
        elif not self.train_text:
            with torch.no_grad():
                out = self.text_encoder(conds)
                context, labels = out.tokens.to(self.dtype), out.labels
        concat = None
        if self.concat is not None:
            concat = self.concat.training_input(batch, images, latents, self.encode, self._generator)

        def model_fn(z, t):
            z = z.to(self.dtype)
            if self.cfg.channels_last:
                z = z.contiguous(memory_format=torch.channels_last)
            with self.precision.forward_context(self.device):
                out = self.engine(
                    z, t, context=context, labels=labels, conditions=conds if self.train_text else None
                )
            return out.float() if self.precision.autocast else out

        loss, _ = self.objective.loss(model_fn, latents, self._generator, concat=concat)
        loss = perturb(loss, step)
        self.engine.backward(loss)
        self._losses.append(loss.detach())
        return loss.detach()

    def set_lr_factor(self, factor: float) -> None:
        set_lr(self.engine, self.lr * factor)

    def optimizer_step(self) -> bool:
        losses, self._losses = self._losses, []
        return engine_step(self.engine, losses)

    def metrics(self) -> dict[str, torch.Tensor]:
        scale = loss_scale(self.engine)
        return {} if scale is None else {"loss_scale": torch.tensor(scale)}

    # -- samples and frozen parts ----------------------------------------------------------------------------
    def pipeline(self, unet: nn.Module | None = None) -> LatentDiffusionPipeline:
        """The current (raw) weights, or ``unet``, as a pipeline."""
        return LatentDiffusionPipeline(
            unet or self.engine.module.unet,
            self.autoencoder,
            self.text_encoder,
            self.diffusion,
            self.scale_factor,
            self.concat,
        )

    def sampling_pipeline(self, weights: dict[str, torch.Tensor]) -> LatentDiffusionPipeline | None:
        """A pipeline on a fresh copy of the UNet (and trained text encoder) holding ``weights``."""
        if self.concat is not None:  # concat models need per-prompt inputs (masks, low-res images)
            return None
        unet = with_weights(build(self.cfg.unet, "unet", UNetModel), weights, "unet.")
        unet.to(self.device, self.dtype)
        text = self.text_encoder
        if self.train_text:
            text = with_weights(build(self.cfg.text_encoder, "text_encoder", ConditionEncoder), weights,
                                "text_encoder.").to(self.device, self.dtype)  # fmt: skip
        return LatentDiffusionPipeline(
            unet, self.autoencoder, text, self.diffusion, self.scale_factor, self.concat
        )

    @torch.no_grad()
    def samples(
        self, prompts: list[str], steps: int, guidance: float, weights: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, str]:
        pipe = self.sampling_pipeline(weights)
        if pipe is None:
            return None, ""
        opts = GenerateOptions(steps=steps, guidance=guidance, seeds=list(range(len(prompts))))
        return pipe.generate(list(prompts), opts), " | ".join(prompts)

    def save_frozen(self, folder: Path, write: bool) -> None:
        meta_file = folder / "frozen.json"
        if meta_file.is_file():  # a resumed (or reused) run: the frozen parts must be the ones it began with
            before = json.loads(meta_file.read_text())
            now = {"scale_factor": self.scale_factor, **self.fingerprints}
            then = {"scale_factor": before.get("scale_factor"), **before.get("fingerprints", {})}
            changed = [k for k in now if then.get(k) != now[k]]
            if changed:
                raise ConfigError(
                    f"{meta_file}: this run was trained with other {', '.join(changed)} ({then} now {now}): "
                    "resuming would silently change what the UNet learned on; use a new run_dir, or the weights "
                    "the run began with"
                )
            return
        if not write:
            return
        meta: dict[str, Any] = {"scale_factor": self.scale_factor, "fingerprints": self.fingerprints}
        frozen = {"autoencoder": self.autoencoder} | (
            {} if self.train_text else {"text_encoder": self.text_encoder}
        )
        for name, module in frozen.items():
            sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            atomic_save(folder / f"{name}.safetensors", lambda tmp, sd=sd: save_file(sd, str(tmp)))
            meta[name] = config_dict(module.config)
        atomic_json(folder / "frozen.json", meta)

    def export(
        self, checkpoint: Path, out: Path, ema: bool = True, formats: frozenset[str] = frozenset()
    ) -> Path:
        from ..inference.export import DEFAULT_FORMATS, export_pipeline

        return export_pipeline(checkpoint, out, ema, formats or DEFAULT_FORMATS)
