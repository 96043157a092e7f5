"""Training-step time of the demo's UNet stage under variants of its attention (issue 19, P20).

    .venv/bin/python bench/demo_probes/unet_step_variants.py [--rounds 6] [--threads 2]

The step of ``bench/cpu_precision_step.py`` (``unet/demo`` + the jointly trained text encoder, 64 latents,
bf16 autocast, fused AdamW), interleaved round after round, for:

- the preset as it is;
- bf16 CPU attention through torch's fp32 flash kernel at every length (``CPU_BF16_EXPLICIT_MAX_SCORES = 0``,
  what the code did before P20) instead of the explicit QK^T / fp32 softmax at short lengths;
- spatial transformers at other latent resolutions (``attention_resolutions``: 1 = 8x8, 2 = 4x4, 4 = 2x2).

Printed: median seconds a step and the speed relative to the preset.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_precision_step

from trainer.config import build, conf_root
from trainer.models import attention

VARIANTS = {
    "preset": ({}, None),
    "fp32 flash attention at every length (before P20)": ({}, 0),
    "attention at 8x8, 4x4, 2x2 (before P20)": ({"attention_resolutions": [1, 2, 4]}, None),
    "attention at 8x8, 4x4": ({"attention_resolutions": [1, 2]}, None),
    "attention at 4x4 only": ({"attention_resolutions": [2]}, None),
}


def make(unet_overrides: dict, explicit_limit: int | None):
    original = cpu_precision_step.preset

    def preset(path: str, protocol):
        cfg = OmegaConf.load(conf_root() / f"{path}.yaml")
        if path == "unet/demo":
            cfg = OmegaConf.merge(cfg, unet_overrides)
        torch.manual_seed(0)
        return build(cfg, path, protocol)

    cpu_precision_step.preset = preset
    try:
        step, _ = cpu_precision_step.unet_step("bf16-autocast", False, True)
    finally:
        cpu_precision_step.preset = original
    limit = attention.CPU_BF16_EXPLICIT_MAX_SCORES if explicit_limit is None else explicit_limit

    def run() -> None:
        old, attention.CPU_BF16_EXPLICIT_MAX_SCORES = attention.CPU_BF16_EXPLICIT_MAX_SCORES, limit
        try:
            step()
        finally:
            attention.CPU_BF16_EXPLICIT_MAX_SCORES = old

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps = {name: make(*spec) for name, spec in VARIANTS.items()}
    for step in steps.values():
        step(), step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["preset"])
    print(
        f"UNet demo + text encoder, batch 64 ({args.threads} thread(s), {args.rounds} rounds x {args.steps} steps)"
    )
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:52s} {t:6.3f} s/step  speed x{base / t:4.2f}")


if __name__ == "__main__":
    main()
