"""Wall time of the demo's training stages under variants, as ``make demo`` runs them (issue 19, P21).

    .venv/bin/python bench/demo_probes/stage_variants.py DEMO_RUN [--stage unet|autoencoder] [--steps 200]
        [--rounds 2] [--variant NAME=OVERRIDE,OVERRIDE ...]

DEMO_RUN is a finished (or stopped after precompute) ``make demo`` run folder: its ``data/mixed`` shards feed
the autoencoder stage and its ``latents`` and ``autoencoder/export`` the UNet stage. Each variant is the real
``python -m trainer.cli.train`` of that stage for ``--steps`` steps (no checkpoints), run alternately, round
after round, so a slow spell of the machine falls on every variant alike. Printed per variant: the median
seconds a step over the steps after the first 25 (from the process's own metrics log) and the process's wall
time, and both relative to the first variant, and the process's minor page faults a step. Default variants: the
loader's worker process against loading in the training process (``data.num_workers=0``: the same batches, each
sample is seeded by its key). An override written ``@NAME=VALUE`` sets an environment variable of the process
instead (P22: ``@MALLOC_MMAP_MAX_=0``, glibc's allocator tunables).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer.demo.figures import read_metrics
from trainer.demo.run import DemoBudget

DEFAULT_VARIANTS = ["worker=data.num_workers=1", "in-process=data.num_workers=0"]


def stage_args(stage: str, run: Path, steps: int, out: Path) -> list[str]:
    common = [f"run_dir={out}", f"max_steps={steps}", "checkpoint.every=100000", "checkpoint.save_final=false",
              "logger.log_every=1", "logger.progress=false"]  # fmt: skip
    budget = DemoBudget()  # the demo's batches, so the probe times the steps the demo takes
    if stage == "autoencoder":
        return ["experiment=demo_autoencoder", f"data.batch_size={budget.ae_batch}",
                f"data.urls={run / 'data/mixed'}", *common]  # fmt: skip
    return ["experiment=demo_unet", f"data.batch_size={budget.unet_batch}", f"data.urls={run / 'latents'}",
            f"weights.autoencoder={run / 'autoencoder/export'}", *common]  # fmt: skip


def one(stage: str, run: Path, steps: int, overrides: list[str]) -> tuple[float, float, float]:
    """(median step seconds after step 25, process wall seconds, minor page faults a step) of one training run."""
    env = dict(os.environ) | dict(o[1:].split("=", 1) for o in overrides if o.startswith("@"))
    hydra = [o for o in overrides if not o.startswith("@")]
    with tempfile.TemporaryDirectory(prefix="stagevar_") as tmp:
        out = Path(tmp) / "run"
        faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "trainer.cli.train", *stage_args(stage, run, steps, out), *hydra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults
        times = [r["step_time"] for r in read_metrics(out)[1] if "step_time" in r and r["step"] > 25]
    return statistics.median(times), wall, faults / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--stage", choices=["unet", "autoencoder"], default="unet")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variant", action="append", help="NAME=override[,override...]")
    args = p.parse_args()
    variants = {}
    for spec in args.variant or DEFAULT_VARIANTS:
        name, _, overrides = spec.partition("=")
        variants[name] = [o for o in overrides.split(",") if o]
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, overrides in variants.items():
            results[name].append(one(args.stage, args.run.resolve(), args.steps, overrides))
            step, wall, faults = results[name][-1]
            print(
                f"round {r}: {name}: {step:.3f} s a step, {wall:.1f} s wall, {faults:.0f} faults a step",
                flush=True,
            )
    medians = {
        name: [statistics.median(column) for column in zip(*res, strict=True)]
        for name, res in results.items()
    }
    base_step, base_wall, _ = medians[next(iter(variants))]
    print(f"\n{args.stage}, {args.steps} steps, {args.rounds} rounds (medians; speed relative to the first):")
    for name, (step, wall, faults) in medians.items():
        ratios = (
            f"{step:.3f} s a step (x{base_step / step:.2f})   {wall:.1f} s wall (x{base_wall / wall:.2f})"
            f"   {faults:.0f} minor faults a step"
        )
        print(f"  {name:<24} {ratios}")


if __name__ == "__main__":
    main()
