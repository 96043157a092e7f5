"""Training-step throughput of our UNet against diffusers' UNet2DConditionModel, same config and weights.

    .venv/bin/python bench/unet_step.py [--batch 4] [--latent 32] [--rounds 3] [--steps 3] [--compile]
    # on a GPU: --device cuda --dtype bf16 --config sd2 --latent 32 --batch 64 [--attention xformers]

A step is forward + MSE loss + backward + AdamW. The variants run interleaved, round after round, and the
median samples/s of each is reported with its ratio to diffusers. With --config sd2 the model FLOPs
utilization is also printed (training FLOPs per sample from ``ldm-info``'s plan x samples/s / --peak-tflops).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from trainer.models.convert import diffusers_unet_config, unet_to_diffusers
from trainer.models.unet import UNetConfig, UNetModel
from trainer.plan import flops_per_sample

# SD 2.x proportions at a fifth of the width (320 -> 64 channels): same levels, blocks, attention placement.
SMALL = UNetConfig(
    model_channels=64,
    channel_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attention_resolutions=[4, 2, 1],
    num_heads=-1,
    head_dim=32,
    context_dim=256,
    use_linear_in_transformer=True,
    sample_size=32,
)
SD2 = UNetConfig(
    model_channels=320,
    channel_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attention_resolutions=[4, 2, 1],
    num_heads=-1,
    head_dim=64,
    context_dim=1024,
    use_linear_in_transformer=True,
    sample_size=32,
)


def make_step(model, channels_last: bool, forward, compile_: bool, lr: float = 1e-4):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)  # the same fused kernel for every variant
    fwd = torch.compile(forward) if compile_ else forward

    def step(x, t, ctx, target):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.mse_loss(fwd(x, t, ctx).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["small", "sd2"], default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd variants")
    p.add_argument("--no-diffusers", action="store_true", help="only ours (e.g. xformers runs)")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)"
    )
    args = p.parse_args()
    dev, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    base = SMALL if args.config == "small" else SD2
    cfg = UNetConfig(**{**vars(base), "attention": args.attention, "sample_size": args.latent})
    torch.manual_seed(0)
    ours = UNetModel(cfg)
    with torch.no_grad():  # no zero-initialised layers: both models do the full work
        for prm in ours.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    variants: dict[str, tuple] = {}
    if not args.no_diffusers:
        ref = UNet2DConditionModel(**diffusers_unet_config(cfg))
        ref.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg))
        ref.to(dev, dtype).train()

        def ref_fwd(x, t, c):
            return ref(x, t, c).sample

        variants["diffusers"] = (ref, make_step(ref, False, ref_fwd, False))
    ours.to(dev, dtype).train()
    variants["ours (NCHW)"] = (ours, make_step(ours, False, ours, False))
    ours_cl = UNetModel(cfg).to(dev, dtype)
    ours_cl.load_state_dict(ours.state_dict())
    ours_cl.to(memory_format=torch.channels_last).train()
    variants["ours (channels-last, default)"] = (ours_cl, make_step(ours_cl, True, ours_cl, False))
    if args.compile:
        ours_c = UNetModel(cfg).to(dev, dtype)
        ours_c.load_state_dict(ours.state_dict())
        ours_c.train()  # weights stay contiguous (fused AdamW wants them so); activations are channels-last
        variants["ours (channels-last + compile)"] = (ours_c, make_step(ours_c, True, ours_c, True))
        if "diffusers" in variants:
            ref_c = variants["diffusers"][0]

            def ref_c_fwd(x, t, c):
                return ref_c(x, t, c).sample

            variants["diffusers + compile"] = (ref_c, make_step(ref_c, False, ref_c_fwd, True))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg.in_channels, args.latent, args.latent, generator=g).to(dev, dtype)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(dev)
    ctx = torch.randn(args.batch, 77, cfg.context_dim, generator=g).to(dev, dtype)
    target = torch.randn(args.batch, cfg.out_channels, args.latent, args.latent, generator=g).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for name, (_, step) in variants.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        for _ in range(2):
            step(x, t, ctx, target)
        sync()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (_, step) in variants.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x, t, ctx, target)
            sync()
            rates[name].append(args.batch * args.steps / (time.perf_counter() - t0))
    n = sum(prm.numel() for prm in ours.parameters())
    print(
        f"config {args.config}: {n / 1e6:.1f}M params, batch {args.batch}, latent {args.latent}, {args.device} "
        f"{args.dtype}, attention {args.attention}, {args.rounds} rounds x {args.steps} steps, threads "
        f"{torch.get_num_threads()}"
    )
    flops = None
    if args.config == "sd2":
        with torch.device("meta"):
            meta = UNetModel(UNetConfig(**{**vars(cfg), "attention": "math"}))
        flops = flops_per_sample(meta, None, None, args.latent * 8)["unet_train"]
    ref_rate = statistics.median(rates["diffusers"]) if "diffusers" in rates else None
    for name, r in rates.items():
        m = statistics.median(r)
        line = f"{name:34s} {m:9.2f} samples/s"
        if ref_rate:
            line += f"   ratio vs diffusers {m / ref_rate:.3f}"
        if flops:
            line += f"   MFU {flops * m / (args.peak_tflops * 1e12) * 100:.1f}%"
        print(line)


if __name__ == "__main__":
    main()
