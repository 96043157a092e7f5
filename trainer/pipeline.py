"""A trained latent diffusion model as one object: UNet + autoencoder + condition encoder + noise schedule,
with text-to-image, image-to-image, inpainting and super-resolution generation, and our native export format.

Native format (a folder): ``pipeline.json`` (component configs, latent scale factor, diffusion config) and one
``.safetensors`` file per component. Loading never runs pickled code and never downloads weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from .config import build
from .diffusion.guidance import Inpaint, sample_loop
from .diffusion.objectives import DiffusionConfig
from .diffusion.samplers import make_sampler, randn
from .diffusion.schedules import NoiseSchedule, ScheduleConfig

FORMAT = "ldm-pipeline/1"
COMPONENTS = ("unet", "autoencoder", "text_encoder")


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
    cfg = asdict(module.config)
    if "pretrained" in cfg:
        cfg["pretrained"] = ""  # weights come from the export itself
    return cfg


class LatentDiffusionPipeline:
    def __init__(
        self,
        unet,
        autoencoder,
        text_encoder,
        diffusion: DiffusionConfig,
        scale_factor: float,
        concat: str = "none",
    ):
        self.unet, self.autoencoder, self.text_encoder = unet, autoencoder, text_encoder
        self.diffusion, self.scale_factor, self.concat = diffusion, scale_factor, concat
        self.schedule = NoiseSchedule(diffusion.schedule)

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
        """Write the native export; files appear complete or not at all (temp names, then rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "scale_factor": self.scale_factor,
            "concat": self.concat,
            "diffusion": asdict(self.diffusion),
        }
        for name in COMPONENTS:
            module = getattr(self, name)
            meta[name] = _component_config(module)
            sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            tmp = folder / f".{name}.safetensors.tmp"
            save_file(sd, str(tmp))
            tmp.replace(folder / f"{name}.safetensors")
        tmp = folder / ".pipeline.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        tmp.replace(folder / "pipeline.json")
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> LatentDiffusionPipeline:
        folder = Path(folder)
        meta_file = folder / "pipeline.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{folder} is not a pipeline export (no pipeline.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
        modules: dict[str, Any] = {}
        for name in COMPONENTS:
            module = build(OmegaConf.create(meta[name]), name)
            module.load_state_dict(load_file(str(folder / f"{name}.safetensors")), strict=True)
            modules[name] = module.eval().to(device)
        d = meta["diffusion"]
        diffusion = DiffusionConfig(**{**d, "schedule": ScheduleConfig(**d["schedule"])})
        return cls(
            modules["unet"],
            modules["autoencoder"],
            modules["text_encoder"],
            diffusion,
            float(meta["scale_factor"]),
            meta.get("concat", "none"),
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

    @torch.no_grad()
    def generate_latents(
        self,
        prompts: list,
        opts: GenerateOptions,
        init_image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Clean latents for ``prompts`` (strings, or class labels), one seed per prompt.

        ``init_image`` ([-1, 1]) starts image-to-image at ``opts.strength``; with ``mask`` (1 = repaint) it
        inpaints; ``low_res`` ([-1, 1]) conditions a super-resolution model.
        """
        if len(opts.seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(opts.seeds)} seeds")
        dev = self.device
        dtype = next(self.unet.parameters()).dtype
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in opts.seeds]
        shape = self._latent_shape(len(prompts), opts)
        noise = randn(shape, gens, dev, torch.float32).to(dtype)
        cond = self.text_encoder(prompts).tokens.to(dtype)
        null = [opts.negative_prompt] * len(prompts) if isinstance(prompts[0], str) else [-1] * len(prompts)
        uncond = self.text_encoder(null).tokens.to(dtype) if opts.guidance != 1.0 else None
        sampler = make_sampler(
            opts.sampler,
            self.schedule,
            self.diffusion.prediction,
            eta=opts.eta,
            spacing=opts.spacing,
            steps_offset=opts.steps_offset,
            set_alpha_to_one=opts.set_alpha_to_one,
        )
        init = concat = inpaint = None
        if init_image is not None:
            init = self.encode_images(init_image).to(dtype)
        if mask is not None:
            if init is None:
                raise ValueError("inpainting needs an init image")
            keep = 1.0 - F.interpolate(mask.to(dev).float(), size=shape[-2:], mode="nearest").to(dtype)
            if self.concat == "inpaint":
                masked = self.encode_images(init_image * (mask.to(init_image.device) < 0.5)).to(dtype)
                concat = torch.cat([1 - keep, masked], dim=1)
            else:
                inpaint = Inpaint(init, keep)
            init = None if self.concat == "inpaint" else init
        if self.concat == "superres":
            if low_res is None:
                raise ValueError("this is a super-resolution model: give a low-resolution image")
            concat = F.interpolate(low_res.to(dev).float(), size=shape[-2:], mode="bicubic").to(dtype)

        def denoiser(x, t, ctx):
            return self.unet(x, t, ctx)

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
