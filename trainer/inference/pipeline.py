"""A trained latent diffusion model as one object: UNet + autoencoder + condition encoder + noise schedule,
with generation for every conditioning mode, and our native export format.

``generate(prompts, opts, **inputs)`` knows no kinds: each prompt is a raw condition of the model's encoder (a
caption, a class id, a layout; a string is parsed by the encoder, so ``ldm-sample --prompt`` works for all) and
``inputs`` are images the model's concat condition consumes (``low_res``, ``segmentation``, ``init_image`` +
``mask``) or, for any model, ``init_image`` (image-to-image) and ``mask`` (blended inpainting).

Native format (a folder): ``pipeline.json`` (component configs, latent scale factor, diffusion config) and one
``.safetensors`` file per component. Loading never runs pickled code and never downloads weights: each config
read back is checked against the schema of a known component class (never instantiated recursively).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data_pipeline.atomic import atomic_json, atomic_save

from ..config import build, config_dict, offline
from ..diffusion.guidance import Inpaint, sample_loop
from ..diffusion.objectives import Diffusion
from ..diffusion.samplers import make_sampler, randn
from ..models.autoencoder import Autoencoder
from ..models.text_encoders import ConditionEncoder
from ..models.unet import UNetModel
from ..tasks.concat import ConcatCondition

FORMAT = "ldm-pipeline/2"
COMPONENTS = {"unet": UNetModel, "autoencoder": Autoencoder, "text_encoder": ConditionEncoder}


@dataclass
class GenerateOptions:
    steps: int = 50
    guidance: float = 7.5
    sampler: str = "ddim"  # ddim | ddpm | dpmpp_2m
    eta: float = 0.0
    spacing: str = "leading"
    steps_offset: int = 1  # Stable Diffusion's DDIM settings (what its scheduler configs and our exports say)
    set_alpha_to_one: bool = False
    height: int = 0  # 0: the model's native size
    width: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    negative_prompt: str = ""
    strength: float = 0.8  # image-to-image


def _component_config(module: torch.nn.Module) -> dict:
    cfg = config_dict(module.config)
    if "pretrained" in cfg:
        cfg["pretrained"] = ""  # weights come from the export itself
    return cfg


class LatentDiffusionPipeline:
    def __init__(
        self,
        unet,
        autoencoder,
        text_encoder,
        diffusion: Diffusion,
        scale_factor: float,
        concat: ConcatCondition | None = None,
    ):
        self.unet, self.autoencoder, self.text_encoder = unet, autoencoder, text_encoder
        self.diffusion, self.scale_factor, self.concat = diffusion, scale_factor, concat
        self.schedule = diffusion.schedule

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device, dtype: torch.dtype | None = None) -> LatentDiffusionPipeline:
        for m in (self.unet, self.autoencoder, self.text_encoder):
            m.to(device)
        if dtype is not None:
            self.unet.to(dtype)
        return self

    # -- native format ---------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the native export; every file appears complete or not at all."""
        folder = Path(folder)
        meta = {
            "format": FORMAT,
            "scale_factor": self.scale_factor,
            "concat": config_dict(self.concat.config) if self.concat is not None else None,
            "diffusion": self.diffusion.to_dict(),
        }
        for name in COMPONENTS:
            module = getattr(self, name)
            meta[name] = _component_config(module)
            sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            atomic_save(folder / f"{name}.safetensors", lambda tmp, sd=sd: save_file(sd, str(tmp)))
        atomic_json(folder / "pipeline.json", meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> LatentDiffusionPipeline:
        folder = Path(folder)
        meta_file = folder / "pipeline.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{folder} is not a pipeline export (no pipeline.json)")
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(
                f"{meta_file}: format {found!r}, expected {FORMAT!r} (re-export with ldm-export)"
            )
        modules: dict[str, Any] = {}
        for name, protocol in COMPONENTS.items():
            module = build(offline(meta[name]), f"{meta_file}:{name}", protocol)
            module.load_state_dict(load_file(str(folder / f"{name}.safetensors")), strict=True)
            modules[name] = module.eval().to(device)
        concat = build(meta["concat"], f"{meta_file}:concat", ConcatCondition) if meta.get("concat") else None
        return cls(
            modules["unet"],
            modules["autoencoder"],
            modules["text_encoder"],
            Diffusion.from_node(meta["diffusion"]),
            float(meta["scale_factor"]),
            concat,
        )

    # -- generation --------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> scaled latents (posterior means)."""
        return self.autoencoder.encode_latents(images.to(self.device)) * self.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> [0, 1] images."""
        images = self.autoencoder.decode(latents / self.scale_factor)
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _latent_shape(self, n: int, opts: GenerateOptions) -> tuple[int, ...]:
        f = self.autoencoder.config.downsampling
        h = (opts.height or self.unet.config.sample_size * f) // f
        w = (opts.width or self.unet.config.sample_size * f) // f
        return (n, self.autoencoder.config.embed_dim, h, w)

    def encode_conditions(self, conditions: list, dtype: torch.dtype) -> tuple:
        """(context tokens, class labels or None) for raw conditions; strings are parsed by the encoder."""
        raw = [self.text_encoder.parse(c) if isinstance(c, str) else c for c in conditions]
        out = self.text_encoder(raw)
        labels = out.labels if self.unet.config.num_classes > 0 else None
        return out.tokens.to(dtype), labels

    @torch.no_grad()
    def generate_latents(
        self, prompts: list, opts: GenerateOptions, progress: bool = False, **inputs: torch.Tensor | None
    ) -> torch.Tensor:
        """Clean latents for ``prompts`` (raw conditions or strings), one seed per prompt.

        ``inputs``: what the model's concat condition consumes (``low_res`` and ``segmentation`` at any size:
        the output size is ``opts.height`` x ``opts.width``); ``init_image`` ([-1, 1]) starts image-to-image at
        ``opts.strength``, and with ``mask`` (1 = repaint) it inpaints.
        """
        if len(opts.seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(opts.seeds)} seeds")
        dev = self.device
        dtype = next(self.unet.parameters()).dtype
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in opts.seeds]
        shape = self._latent_shape(len(prompts), opts)
        noise = randn(shape, gens, dev, torch.float32).to(dtype)
        cond = self.encode_conditions(prompts, dtype)
        null = self.text_encoder.null_conditions(len(prompts), opts.negative_prompt)
        uncond = self.encode_conditions(null, dtype) if opts.guidance != 1.0 else None
        sampler = make_sampler(
            opts.sampler,
            self.schedule,
            self.diffusion.parameterization,
            eta=opts.eta,
            spacing=opts.spacing,
            steps_offset=opts.steps_offset,
            set_alpha_to_one=opts.set_alpha_to_one,
        )
        given = {k: v.to(dev) for k, v in inputs.items() if v is not None}
        consumed = self.concat.sampling_inputs() if self.concat is not None else frozenset()
        unused = set(given) - consumed - {"init_image", "mask"}
        if unused:
            raise ValueError(f"this model takes no {sorted(unused)} (it has no such concat condition)")
        concat = (
            self.concat.sampling_input(shape, self.encode_images, given).to(dtype) if self.concat else None
        )
        init = inpaint = None
        if "init_image" in given and "init_image" not in consumed:
            init = self.encode_images(given["init_image"]).to(dtype)
        if (
            "mask" in given and "mask" not in consumed
        ):  # a model without concat inputs: blend the known region
            if init is None:
                raise ValueError("inpainting needs an init image")
            keep = 1.0 - F.interpolate(given["mask"].float(), size=shape[-2:], mode="nearest").to(dtype)
            inpaint = Inpaint(init, keep)

        def denoiser(x, t, condition):
            tokens, labels = condition
            return self.unet(x, t, tokens, labels)

        strength = opts.strength if init is not None and inpaint is None else 1.0
        return sample_loop(
            denoiser,
            sampler,
            noise,
            cond,
            uncond,
            opts.guidance,
            opts.steps,
            gens,
            init=init,
            strength=strength,
            concat=concat,
            inpaint=inpaint,
            progress=progress,
        )

    def generate(self, prompts: list, opts: GenerateOptions, **kw) -> torch.Tensor:
        """[0, 1] images (B, 3, H, W)."""
        with torch.no_grad():
            return self.decode_latents(self.generate_latents(prompts, opts, **kw))


def load_pipeline(path: str | Path, device: str = "cpu", ema: bool = True) -> LatentDiffusionPipeline:
    """A native export, or the latest (or given) training checkpoint (its EMA weights unless ``ema=False``)."""
    path = Path(path)
    if (path / "pipeline.json").is_file():
        return LatentDiffusionPipeline.load(path, device)
    from .export import pipeline_from_checkpoint

    return pipeline_from_checkpoint(path, device=device, ema=ema)
