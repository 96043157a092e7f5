"""Training-step time of the demo's autoencoder under layout and GroupNorm variants (issue 19, P20; none adopted).

    .venv/bin/python bench/demo_probes/ae_step_variants.py [--rounds 6] [--threads 2]

The step of ``bench/cpu_precision_step.py`` (``autoencoder/demo_f8``, L2 + KL, bf16 autocast, fused AdamW),
interleaved round after round, for:

- the preset (channels-last, GroupNorm in fp32 for bf16 CPU input);
- GroupNorm through torch's NCHW bf16 kernel where a feature map has at least 64x64 pixels (torch's
  channels-last GroupNorm backward is slow with 2 channels a group), fp32 elsewhere;
- the whole model in NCHW, GroupNorm in fp32 and in bf16;
- 32-px windows instead of 64-px images, at batch 32, 64 and 128 (128 windows hold the pixels of 32 images).

Printed: median seconds a step and the speed relative to the preset.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_precision_step

from trainer.models import norm

PLAIN_FORWARD = norm.GroupNorm.forward
MODE = {"nchw_bf16_from": 0}  # GroupNorm inputs with at least this many pixels take the NCHW bf16 kernel


def forward(self, x: torch.Tensor) -> torch.Tensor:
    big = MODE["nchw_bf16_from"] and x.dim() == 4 and x.shape[2] * x.shape[3] >= MODE["nchw_bf16_from"]
    if big and norm.cpu_bf16(x) and x.is_contiguous(memory_format=torch.channels_last):
        with torch.autocast("cpu", enabled=False):
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
        return y.contiguous(memory_format=torch.channels_last)
    return PLAIN_FORWARD(self, x)


@contextlib.contextmanager
def nchw_bf16_from(pixels: int):
    old, MODE["nchw_bf16_from"] = MODE["nchw_bf16_from"], pixels
    try:
        yield
    finally:
        MODE["nchw_bf16_from"] = old


def make(
    channels_last: bool = True, nchw_from: int = 0, plain_bf16: bool = False, size: int = 64, batch: int = 32
):
    step, _ = cpu_precision_step.ae_step("bf16-autocast", plain_bf16, True, batch, size, channels_last)

    def run() -> None:
        with nchw_bf16_from(nchw_from):
            step()

    return run


VARIANTS = {
    "preset (channels-last, fp32 GroupNorm)": {},
    "NCHW bf16 GroupNorm at >= 64x64 pixels": {"nchw_from": 64 * 64},
    "whole model NCHW, fp32 GroupNorm": {"channels_last": False},
    "whole model NCHW, bf16 GroupNorm": {"channels_last": False, "plain_bf16": True},
    "32-px windows, batch 32": {"size": 32},
    "32-px windows, batch 64": {"size": 32, "batch": 64},
    "32-px windows, batch 128": {"size": 32, "batch": 128},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    norm.GroupNorm.forward = forward
    steps = {name: make(**spec) for name, spec in VARIANTS.items()}
    for step in steps.values():
        step(), step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["preset (channels-last, fp32 GroupNorm)"])
    print(f"autoencoder demo_f8 ({args.threads} thread(s), {args.rounds} rounds x {args.steps} steps)")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:42s} {t:6.3f} s/step  speed x{base / t:4.2f}")


if __name__ == "__main__":
    main()
