"""UNet-stage training from latent shards against encoding images on the fly; precompute against the bare encoder.

    .venv/bin/python bench/latents_vs_images.py [--num 96] [--batch 8] [--rounds 3] [--steps 3] [--vae-ch 32]

SD proportions at reduced width: the UNet of bench/unet_step.py (64 channels, a fifth of SD's 320) and an f=8
KL autoencoder with SD's VAE layout at ``--vae-ch`` channels (32: a quarter of SD's 128), 256x256 images (32x32
latents), CPU fp32. Training steps (loader -> [encode] -> UNet forward/backward -> AdamW) alternate between the
two data paths round by round; the same UNet weights, batch and optimizer settings are used by both. The
precompute part times ``ldm-precompute``'s encoding loop over the same shards against a bare ``encode()`` of
already-decoded images in batches of the same size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_loader import make_shards
from unet_step import SMALL

from data_pipeline.images import ImageShards, ImageShardsConfig
from data_pipeline.latents import MANIFEST, LatentShards, LatentShardsConfig
from trainer.models.autoencoder import AutoencoderConfig, AutoencoderKL
from trainer.models.unet import UNetModel


def run_precompute(shards: Path, out: Path, ae_dir: Path, batch: int) -> tuple[float, float]:
    """ldm-precompute (single process) over the shards: (its encoding loop's images/s, wall-clock images/s)."""
    import re
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "trainer.cli.precompute",
        f"out={out}",
        f"data.urls={shards}",
        "autoencoder=kl_f8",
        f"autoencoder.ch={json.loads((ae_dir / 'ch.json').read_text())}",
        f"weights.autoencoder={ae_dir}",
        "data.resolution=256",
        "data.num_workers=1",
        f"batch_size={batch}",
        "progress=false",
        "scale_samples=16",
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    n = json.loads((out / MANIFEST).read_text())["samples"]
    loop = float(re.search(r"ranks, ([0-9.]+) img/s", done.stdout).group(1))
    return loop, n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vae-ch", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    vae_cfg = AutoencoderConfig(ch=args.vae_ch, ch_mult=[1, 2, 4, 4], num_res_blocks=2, resolution=256)
    vae = AutoencoderKL(vae_cfg).eval().requires_grad_(False)
    unet = UNetModel(SMALL).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    ctx = torch.randn(args.batch, 77, SMALL.context_dim)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_shards(tmp / "images", args.num, 256, per_shard=args.num // 4)
        from safetensors.torch import save_file

        (tmp / "ae").mkdir()
        save_file(
            {k: v.contiguous() for k, v in vae.state_dict().items()},
            str(tmp / "ae" / "autoencoder.safetensors"),
        )
        (tmp / "ae" / "ch.json").write_text(str(args.vae_ch))
        pre_rate, pre_wall = run_precompute(tmp / "images", tmp / "latents", tmp / "ae", args.batch)
        # the bare encoder on decoded, cropped images, batch by batch
        cfg = ImageShardsConfig(
            urls=str(tmp / "images"),
            resolution=256,
            batch_size=args.batch,
            num_workers=0,
            shuffle_buffer=1,
            caption_dropout=0.0,
        )
        batches = [
            b["image"].float() / 127.5 - 1
            for _, b in zip(range(args.num // args.batch), ImageShards(cfg).loader(0, 1), strict=False)
        ]
        t0 = time.perf_counter()
        with torch.no_grad():
            for x in batches:
                vae.encode(x)
        bare_rate = len(batches) * args.batch / (time.perf_counter() - t0)

        def step(latents: torch.Tensor) -> None:
            t = torch.randint(0, 1000, (latents.shape[0],))
            noise = torch.randn_like(latents)
            out = unet((latents + noise).contiguous(memory_format=torch.channels_last), t, ctx)
            torch.nn.functional.mse_loss(out, noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        img_cfg = ImageShardsConfig(
            urls=str(tmp / "images"),
            resolution=256,
            batch_size=args.batch,
            num_workers=1,
            shuffle_buffer=32,
            resampled=True,
            epoch_samples=10**9,
        )
        lat_cfg = LatentShardsConfig(
            urls=str(tmp / "latents"),
            resolution=256,
            batch_size=args.batch,
            num_workers=1,
            shuffle_buffer=32,
            resampled=True,
            epoch_samples=10**9,
        )
        img_iter, lat_iter = iter(ImageShards(img_cfg).loader(0, 1)), iter(LatentShards(lat_cfg).loader(0, 1))
        scale = json.loads((tmp / "latents" / MANIFEST).read_text())["scale_factor"]

        def images_path() -> None:
            x = next(img_iter)["image"].float() / 127.5 - 1
            with torch.no_grad():
                z = vae.encode_latents(x.contiguous(memory_format=torch.channels_last), sample=True)
            step(z * scale)

        def latents_path() -> None:
            b = next(lat_iter)
            z = b["latent_mean"].float() + b["latent_std"].float() * torch.randn(b["latent_mean"].shape)
            step(z * scale)

        rates: dict[str, list[float]] = {"images (encode on the fly)": [], "latent shards": []}
        images_path(), latents_path()  # warm-up (worker start, first blocks)
        for _ in range(args.rounds):
            for name, fn in zip(rates, (images_path, latents_path), strict=True):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                rates[name].append(args.steps * args.batch / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    a, b = med["images (encode on the fly)"], med["latent shards"]
    print(
        f"UNet {sum(q.numel() for q in unet.parameters()) / 1e6:.1f}M params, VAE ch={args.vae_ch} "
        f"({sum(q.numel() for q in vae.parameters()) / 1e6:.1f}M params, f=8), 256x256, batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads"
    )
    for k, v in med.items():
        print(f"training from {k:28s} {v:7.2f} images/s")
    print(f"ratio latents / images: {b / a:.2f}x  (goal >= 3x)")
    print(
        f"precompute loop {pre_rate:7.2f} images/s (read, decode, crop, encode, pack, write), bare encoder "
        f"forward {bare_rate:7.2f} images/s: ratio {pre_rate / bare_rate:.3f} (goal >= 0.9)"
    )
    print(f"(precompute wall clock incl. start-up and the scale-factor pass: {pre_wall:.2f} images/s)")


if __name__ == "__main__":
    main()
