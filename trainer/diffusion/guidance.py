"""The sampling loop: classifier-free guidance with the conditional and unconditional passes batched together,
image-to-image starts, inpainting (concat-conditioned models, or blending the known region for plain ones) and
concat conditioning (super-resolution)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.progress import progress as progress_bar

from .samplers import Sampler, img2img_start, randn

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (x, t, condition) -> output
Condition = Any  # a tensor (context tokens), None, or a tuple of them (tokens, class labels)


@dataclass
class Inpaint:
    """Keep ``known`` latents where ``keep`` is 1 and generate where it is 0 (latent resolution)."""

    known: torch.Tensor
    keep: torch.Tensor


def batch_conditions(a: Condition, b: Condition) -> Condition:
    """Two conditions as one batch: tensors are concatenated, tuples element by element, None stays None."""
    if isinstance(a, tuple):
        return tuple(batch_conditions(x, y) for x, y in zip(a, b, strict=True))
    return None if a is None else torch.cat([a, b])


def guided(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Condition,
    uncond: Condition | None,
    scale: float,
) -> torch.Tensor:
    """eps_uncond + scale * (eps_cond - eps_uncond), both from one batched call (uncond first, as diffusers)."""
    if uncond is None or scale == 1.0:
        return denoiser(x, t.expand(x.shape[0]), cond)
    out = denoiser(torch.cat([x, x]), t.expand(2 * x.shape[0]), batch_conditions(uncond, cond))
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + scale * (out_cond - out_uncond)


def sample_loop(
    denoiser: Denoiser,
    sampler: Sampler,
    noise: torch.Tensor,
    cond: Condition,
    uncond: Condition | None = None,
    guidance: float = 1.0,
    steps: int = 50,
    generator=None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    concat: torch.Tensor | None = None,
    inpaint: Inpaint | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the sampler from ``noise`` (or from ``init`` noised to ``strength``) and return clean latents.

    ``concat`` is appended to the model input along channels at every step (inpainting models: mask and
    masked latents; super-resolution: the low-resolution image). ``inpaint`` re-imposes the known region,
    noised to the current level, after every step (for models without concat inputs).
    """
    sampler.set_timesteps(steps)
    timesteps = sampler.timesteps
    start = 0
    x = noise
    if init is not None and strength < 1.0:
        start = img2img_start(timesteps, strength)
        x = sampler.add_noise(init, noise, int(timesteps[start]))
    for i in progress_bar(range(start, len(timesteps)), desc="sampling", disable=not progress, leave=False):
        t = timesteps[i]
        inp = x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1)
        out = guided(denoiser, inp, t.to(x.device), cond, uncond, guidance)
        x = sampler.step(out, t, x, generator)
        if inpaint is not None:
            known = inpaint.known
            if i + 1 < len(timesteps):
                fresh = randn(known.shape, generator, known.device, known.dtype)
                known = sampler.add_noise(inpaint.known, fresh, int(timesteps[i + 1]))
            x = inpaint.keep * known + (1 - inpaint.keep) * x
    return x
