"""The paper's downsampling-factor study in miniature: for f = 1, 2, 4, 8, 16, 32, the shipped autoencoder preset
(autoencoder/kl_f{f}: its levels, latent channels and attention) at a CPU width, trained for the same budget on
the synthetic shapes, and a UNet on its latents. Prints, per f: the latent shape, reconstruction PSNR on held-out
shapes, and the UNet's training-step cost (FLOPs per sample, and measured time) at that latent size.

    .venv/bin/python bench/f_study.py [--size 32] [--steps 200] [--batch 16] [--width 16] [--threads 1]

Small f keeps detail but makes the UNet work at (nearly) pixel resolution; large f makes the UNet cheap but the
autoencoder loses what the UNet could ever generate (LDM, Rombach et al. 2022, Sec. 4.1: LDM-4 to LDM-16 balance).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.images import ImageShards, ImageShardsConfig  # noqa: E402
from data_pipeline.synthetic import write_synthetic  # noqa: E402
from trainer.config import build, conf_root  # noqa: E402
from trainer.models.autoencoder import Autoencoder  # noqa: E402
from trainer.models.unet import UNetModel  # noqa: E402
from trainer.plan import flops_per_sample  # noqa: E402

FACTORS = (1, 2, 4, 8, 16, 32)


def images(folder: Path, size: int, batch: int, split_seed: int) -> torch.Tensor:
    """Every image of the shards in ``folder`` as [-1, 1] (N, 3, size, size)."""
    cfg = ImageShardsConfig(urls=str(folder), resolution=size, batch_size=batch, num_workers=0, shuffle_buffer=1,
                            shard_shuffle=False, seed=split_seed)  # fmt: skip
    loader = ImageShards(cfg).loader(0, 1)
    out = []
    for b in loader:
        if int(b["epoch"].max()) > 0:
            break
        out.append(b["image"].float() / 127.5 - 1)
    return torch.cat(out)


def autoencoder(f: int, width: int, size: int) -> torch.nn.Module:
    node = OmegaConf.load(conf_root() / "autoencoder" / f"kl_f{f}.yaml")
    node = OmegaConf.merge(node, {"ch": width, "num_res_blocks": 1, "norm_groups": 8, "resolution": size})
    return build(node, f"autoencoder/kl_f{f}", Autoencoder)


def train_autoencoder(model, data: torch.Tensor, steps: int, batch: int, seed: int = 0) -> float:
    """L1 + 1e-6 KL (LDM's pixel and KL terms; no LPIPS or GAN at this budget), AdamW; returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:  # warm up, then cosine to 5%
            warm = min(1.0, (step + 1) / 30)
            group["lr"] = 2e-3 * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
        rec, reg = model(x)
        loss = F.l1_loss(rec, x) + 1e-6 * reg["kl"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


@torch.no_grad()
def psnr(model, data: torch.Tensor) -> float:
    model.eval()
    rec = torch.cat([model.decode(model.encode_latents(x)) for x in data.split(32)]).clamp(-1, 1)
    mse = ((rec - data) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


UNET = {
    "channel_mult": [1],
    "attention_resolutions": [1],
}  # unet/tiny on one level: it runs on 1x1 latents too


class UNetStep:
    """A training step (forward, MSE, backward, AdamW) of unet/tiny (one level) on ``batch`` latents."""

    def __init__(self, channels: int, latent: int, batch: int):
        node = OmegaConf.merge(OmegaConf.load(conf_root() / "unet" / "tiny.yaml"), UNET,
                               {"in_channels": channels, "out_channels": channels, "sample_size": latent})  # fmt: skip
        with torch.device("meta"):
            meta = build(node, "unet/tiny", UNetModel, attention="math")
        self.flops = flops_per_sample(meta, None, None, latent * 8)["unet_train"]  # no autoencoder: size / 8
        self.unet = build(node, "unet/tiny", UNetModel)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)
        self.x = torch.randn(batch, channels, latent, latent)
        self.ctx, self.t = torch.randn(batch, 77, node.context_dim), torch.randint(0, 1000, (batch,))

    def __call__(self) -> float:
        t0 = time.perf_counter()
        F.mse_loss(self.unet(self.x, self.t, self.ctx), self.x).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=200, help="autoencoder training steps (the same for every f)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--width", type=int, default=16, help="autoencoder base channels (the presets use 128)")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5, help="timed UNet steps per f, interleaved (median)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(f"{tmp}/train", args.train, 500, args.size, seed=0, progress=False)
        write_synthetic(f"{tmp}/held", 96, 96, args.size, seed=1, split="heldout", progress=False)
        train, held = (
            images(Path(tmp, "train"), args.size, 50, 0),
            images(Path(tmp, "held"), args.size, 32, 0),
        )
    rows = []
    for f in FACTORS:
        torch.manual_seed(0)
        model = autoencoder(f, args.width, args.size)
        seconds = train_autoencoder(model, train, args.steps, args.batch)
        rows.append({"f": f, "c": model.config.embed_dim, "latent": args.size // f, "psnr": psnr(model, held),
                     "train_s": seconds})  # fmt: skip
        print(f"f={f}: {rows[-1]}", file=sys.stderr, flush=True)
    steps = [UNetStep(r["c"], r["latent"], args.batch) for r in rows]
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(args.rounds + 1):  # interleaved rounds: load on a shared machine hits every f alike
        for i, step in enumerate(steps):
            times[i].append(step())
    base = steps[2].flops  # f = 4
    print(f"\n{args.size}px synthetic shapes; autoencoder presets at width {args.width} (1 res block), "
          f"{args.steps} steps of {args.batch}; UNet: unet/tiny on one level, batch {args.batch}, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved rounds\n")  # fmt: skip
    print(
        "| f | latent (c x h x w) | latent values / pixel values | recon. PSNR (dB) | UNet GFLOP / sample "
        "| vs f=4 | UNet step (s) | AE training (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r, step, t in zip(rows, steps, times, strict=True):
        ratio = r["c"] * r["latent"] ** 2 / (3 * args.size**2)
        print(
            f"| {r['f']} | {r['c']} x {r['latent']} x {r['latent']} | {ratio:.3g} | {r['psnr']:.1f} | "
            f"{step.flops / 1e9:.3f} | {step.flops / base:.2f}x | {statistics.median(t[1:]):.3f} | "
            f"{r['train_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
