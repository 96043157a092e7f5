"""``ldm-submit``: render an sbatch script from the same config ldm-train / ldm-precompute use, and submit it.

    ldm-submit train experiment=sd2_base_256 launcher.nodes=16 launcher.partition=gpu
    ldm-submit train experiment=sd2_base_256 launcher.nodes=16 --dry-run     # print the script, submit nothing
    ldm-submit precompute data.urls=... weights.autoencoder=... out=...
    ldm-submit pipeline experiment=...        # precompute -> train from the latents, chained with afterok
    ldm-submit train -m experiment=... optim.lr=1e-4,3e-4   # a sweep: one job array, a task per point

See slurm/submit.py (rendering) and slurm/templates/ (the scripts).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from slurm.submit import JOBS, compose_config, pipeline_configs, render, sbatch, sweep_configs

from ..config import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ldm-submit", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("job", choices=[*JOBS, "pipeline"])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for ldm-train / ldm-precompute")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="a sweep (a=1,2 b=x,y): one Slurm job array, a task per point, each in its own run "
                        "folder <run_dir>/<swept values> (train only)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.add_argument("--name", default="", help="file name of the job files (default: <job>-<timestamp>)")
    args = p.parse_intermixed_args(argv)
    if not args.dry_run and shutil.which("sbatch") is None:
        print("ldm-submit: sbatch is not on PATH: run this on a Slurm login node (or --dry-run to see the script)",
              file=sys.stderr)  # fmt: skip
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        if args.multirun:
            jobs = [sweep_configs(args.job, args.overrides)]
        elif args.job == "pipeline":
            jobs = [
                (k, c, [])
                for k, c in zip(("precompute", "train"), pipeline_configs(args.overrides), strict=True)
            ]
        else:
            jobs = [(args.job, compose_config(args.job, args.overrides), [])]
        previous = None
        for kind, cfg, points in jobs:
            # a dry run may describe another machine's files; a pipeline's latents do not exist yet
            for c in points or [cfg]:
                JOBS[kind].check(c, not args.dry_run and args.job != "pipeline")
            folder = Path(JOBS[kind].output(cfg)).resolve() / "slurm"
            name = f"{args.name}-{kind}" if args.name and len(jobs) > 1 else args.name or f"{kind}-{stamp}"
            script, text = render(cfg, kind, name, folder, write=not args.dry_run, points=points)
            if args.dry_run:
                print(text)
                continue
            previous = sbatch(script, after=previous)
            print(f"submitted {kind} job {previous}: {script}")
    except ConfigError as exc:
        print(f"ldm-submit: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
