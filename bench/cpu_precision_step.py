"""Training-step time of the demo's autoencoder and UNet on the CPU: fp32 against bf16 autocast (issue 19).

    .venv/bin/python bench/cpu_precision_step.py [--rounds 6] [--steps 1] [--threads 1]

A step is what the demo's stages do: forward, loss, backward, gradient clipping, AdamW; the autoencoder is
``autoencoder/demo_f8`` on 32 images of 64 px with the demo's loss, the UNet ``unet/demo`` with the jointly
trained ``text_encoder/demo_transformer`` on 64 latents of the preset's shape (8x8x16). Variants, interleaved
round after round:

- fp32 (channels-last, torch.optim.AdamW's for-each loop): the old demo, and the same with fused AdamW (the fair
  comparison on a CPU without AMX, where bf16 runs on avx512_bf16's dot products only);
- bf16 autocast as ``precision=bf16-autocast`` runs it (GroupNorm and attention in fp32 for bf16 CPU tensors);
- the same with torch's own bf16 GroupNorm and attention kernels (``trainer.models.norm.CPU_BF16_IN_FP32=False``);
- bf16 autocast + fused AdamW (``optim.fused``): what the demo presets use.

Printed: median samples/s, its ratio to fp32, and the ratio of CPU time per sample (less disturbed by other
jobs on a shared machine than wall time).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from omegaconf import OmegaConf

from trainer.config import build, conf_root
from trainer.diffusion.objectives import DiffusionObjective
from trainer.engine.precision import precision
from trainer.models import norm
from trainer.models.ae_loss import AutoencoderLoss, AutoencoderLossConfig
from trainer.models.autoencoder import Autoencoder
from trainer.models.text_encoders import ConditionEncoder
from trainer.models.unet import UNetModel
from trainer.tasks.unet import DiffusionModel

# name: (precision, torch's own bf16 GroupNorm/attention, fused AdamW)
VARIANTS = {
    "fp32": ("fp32", False, False),
    "fp32 + fused AdamW": ("fp32", False, True),
    "bf16 autocast": ("bf16-autocast", False, False),
    "bf16 autocast, torch's bf16 GN/attention": ("bf16-autocast", True, False),
    "bf16 autocast + fused AdamW (demo)": ("bf16-autocast", False, True),
}


def preset(path: str, protocol):
    torch.manual_seed(0)
    return build(OmegaConf.load(conf_root() / f"{path}.yaml"), path, protocol)


@contextlib.contextmanager
def kernels(plain_bf16: bool):
    old, norm.CPU_BF16_IN_FP32 = norm.CPU_BF16_IN_FP32, not plain_bf16
    try:
        yield
    finally:
        norm.CPU_BF16_IN_FP32 = old


def ae_step(
    prec_name: str, plain: bool, fused: bool, batch: int = 32, size: int = 64, channels_last: bool = True
):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = preset("autoencoder/demo_f8", Autoencoder).to(memory_format=fmt)
    loss = AutoencoderLoss(AutoencoderLossConfig(pixel_loss="l2", perceptual_weight=0.0, kl_weight=1e-6))
    params = [*model.parameters(), *loss.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused or None)
    prec = precision(prec_name)
    x = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).contiguous(
        memory_format=fmt
    )

    def step():
        with kernels(plain), prec.forward_context(x.device):
            rec, reg = model(x)
        total, _ = loss.generator_loss(x, rec.float(), reg, 0)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, batch


def unet_step(prec_name: str, plain: bool, fused: bool, batch: int = 64):
    from data_pipeline.synthetic import caption_for, combinations

    model = DiffusionModel(
        preset("unet/demo", UNetModel), preset("text_encoder/demo_transformer", ConditionEncoder)
    )
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused or None)
    prec, objective, g = precision(prec_name), DiffusionObjective(), torch.Generator().manual_seed(0)
    s = model.unet.config.sample_size
    latents = torch.randn(batch, model.unet.config.in_channels, s, s, generator=g)
    captions = [caption_for(*c) for c in combinations("train")]
    conditions = [captions[i % len(captions)] for i in range(batch)]

    def model_fn(z, t):
        with kernels(plain), prec.forward_context(z.device):
            out = model(z.contiguous(memory_format=torch.channels_last), t, conditions=conditions)
        return out.float()

    def step():
        loss, _ = objective.loss(model_fn, latents, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for model, make in (
        ("autoencoder demo_f8, batch 32", ae_step),
        ("UNet demo + text encoder, batch 64", unet_step),
    ):
        steps = {name: make(*spec) for name, spec in VARIANTS.items()}
        for step, _ in steps.values():
            for _ in range(args.warmup):
                step()
        rates: dict[str, list[float]] = {k: [] for k in steps}
        cpu: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for name, (step, batch) in steps.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    step()
                rates[name].append(batch * args.steps / (time.perf_counter() - t0))
                cpu[name].append((time.process_time() - c0) / (batch * args.steps))
        base, cbase = statistics.median(rates["fp32"]), statistics.median(cpu["fp32"])
        print(f"\n{model} ({args.threads} thread(s), {args.rounds} rounds x {args.steps} steps)")
        for name in steps:
            r, c = statistics.median(rates[name]), statistics.median(cpu[name])
            print(
                f"  {name:44s} {r:7.1f} samples/s  x{r / base:4.2f}   CPU {1000 * c:6.1f} ms/sample  x{cbase / c:4.2f}"
            )


if __name__ == "__main__":
    main()
