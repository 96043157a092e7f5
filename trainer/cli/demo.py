"""``ldm-demo``: the whole pipeline on CPU with generated data, end to end, in about 20 minutes.

    ldm-demo --out runs/demo                 # what `make demo` runs
    ldm-demo --out runs/demo --quick         # a 3-minute smoke run (tiny budgets; the report still gets written)

The stages and their budgets are trainer/demo/run.py; the report is trainer/demo/report.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..demo.run import QUICK, Demo, DemoBudget


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ldm-demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the plumbing in a few minutes")
    p.add_argument("--ae-steps", type=int)
    p.add_argument("--unet-steps", type=int)
    p.add_argument(
        "--ae-override", action="append", default=[], help="Hydra override for the autoencoder run"
    )
    p.add_argument("--unet-override", action="append", default=[], help="Hydra override for the UNet run")
    p.add_argument(
        "--ranks",
        type=int,
        help="training processes (torchrun, data parallel; default 1: all cores in one process)",
    )
    args = p.parse_args(argv)
    budget = QUICK if args.quick else DemoBudget()
    budget.ae_steps = args.ae_steps or budget.ae_steps
    budget.unet_steps = args.unet_steps or budget.unet_steps
    budget.ranks = args.ranks or budget.ranks
    budget.extra_ae, budget.extra_unet = args.ae_override, args.unet_override
    out = Path(args.out)
    if (out / "unet").exists() or (out / "autoencoder").exists():
        raise SystemExit(f"ldm-demo: {out} already holds a run; remove it or pass another --out")
    report = Demo(out, budget).run()
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
