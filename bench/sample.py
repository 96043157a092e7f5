"""DDIM-50 sampling: ldm-sample's loop against diffusers' StableDiffusionPipeline loop, same UNet weights.

    .venv/bin/python bench/sample.py [--latent 32] [--batch 1] [--rounds 5]

Both run classifier-free guidance (batched cond/uncond, scale 7.5) with SD's DDIM settings (leading spacing,
steps_offset 1, set_alpha_to_one False) from the same noise and prompt embeddings, and stop at the latents
(no VAE decode). Rounds alternate the two; the median time of each and the ratio ours/diffusers are printed,
with the largest difference between their final latents.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL as DiffusersKL
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as dlogging

from trainer.diffusion.guidance import sample_loop
from trainer.diffusion.parameterizations import EpsPrediction
from trainer.diffusion.samplers import DDIMSampler
from trainer.diffusion.schedules import ScaledLinearSchedule
from trainer.models.autoencoder import AutoencoderConfig
from trainer.models.convert import diffusers_unet_config, diffusers_vae_config, unet_to_diffusers
from trainer.models.unet import UNetConfig, UNetModel

TINY = UNetConfig(
    model_channels=32,
    channel_mult=[1, 2, 2],
    num_res_blocks=1,
    attention_resolutions=[1, 2],
    num_heads=2,
    context_dim=64,
    norm_groups=8,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    dlogging.set_verbosity_error()
    torch.manual_seed(0)
    ours = UNetModel(TINY).eval()
    with torch.no_grad():
        for prm in ours.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    ref_unet = UNet2DConditionModel(**diffusers_unet_config(TINY))
    ref_unet.load_state_dict(unet_to_diffusers(ours.state_dict(), TINY))
    vae = DiffusersKL(
        **diffusers_vae_config(AutoencoderConfig(ch=16, ch_mult=[1, 2], norm_groups=8, num_res_blocks=1))
    )
    sd_sched = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=ref_unet.eval(),
        scheduler=DDIMScheduler(**sd_sched),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    schedule = ScaledLinearSchedule()
    sampler = DDIMSampler(
        schedule, EpsPrediction(), eta=0.0, spacing="leading", steps_offset=1, set_alpha_to_one=False
    )
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(args.batch, 77, TINY.context_dim, generator=g)
    uncond = torch.randn(args.batch, 77, TINY.context_dim, generator=g)
    noise = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)

    def run_ours() -> torch.Tensor:
        with torch.no_grad():
            return sample_loop(lambda x, t, c: ours(x, t, c), sampler, noise, cond, uncond, 7.5, args.steps)

    def run_ref() -> torch.Tensor:
        with torch.no_grad():
            return pipe(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                latents=noise.clone(),
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                output_type="latent",
                height=args.latent * 8,
                width=args.latent * 8,
            ).images

    a, b = run_ours(), run_ref()  # warm-up, and the agreement check
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for _ in range(args.rounds):
        for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    mo, md = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(
        f"DDIM-{args.steps}, guidance 7.5, batch {args.batch}, latent {args.latent}x{args.latent}, tiny UNet "
        f"({sum(q.numel() for q in ours.parameters()) / 1e6:.2f}M params), {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"ours       {mo:7.3f} s\ndiffusers  {md:7.3f} s\nratio ours/diffusers {mo / md:.3f}  (goal <= 1.0)"
    )
    print(f"max |latents_ours - latents_diffusers| = {(a - b).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
