"""Per-rank parameter and optimizer-state bytes under ZeRO 0/1/2/3 with 2 ranks (torchrun, gloo, CPU).

    .venv/bin/python bench/zero_memory.py [--precision fp32|bf16]

For each stage, 2 ranks build the same UNet (bench/unet_step.py's SD-proportioned small config) inside our
DeepSpeed engine, take one optimizer step (Adam creates its state lazily), and count the bytes of the distinct
tensor storages each rank holds: the module's parameters (their local shard under ZeRO-3) and the optimizer's
state (Adam's moments plus any fp32 master partition). The ratios to stage 0 are printed; the goals are stage 2
optimizer state <= 0.55x and stage 3 parameters <= 0.55x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def worker(stage: int, precision: str, out: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from unet_step import SMALL

    from trainer.engine import distributed as D
    from trainer.engine.deepspeed_setup import make_engine
    from trainer.engine.optim import AdamW
    from trainer.engine.precision import precision as precision_named
    from trainer.models.unet import UNetModel
    from trainer.schema import DeepSpeedConfig

    env = D.detect()
    D.init(env, torch.device("cpu"))
    torch.manual_seed(0)
    engine = make_engine(
        UNetModel(SMALL), DeepSpeedConfig(zero_stage=stage), AdamW(), 2, precision_named(precision), 1e-4
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(2, 4, 16, 16, dtype=dtype)
    loss = (
        engine(x, torch.tensor([1, 500]), torch.randn(2, 77, SMALL.context_dim, dtype=dtype))
        .float()
        .pow(2)
        .mean()
    )
    engine.backward(loss)
    engine.step()
    params = [getattr(p, "ds_tensor", p.data) for p in engine.module.parameters()]
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    state = [v for s in base.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    # where each ZeRO optimizer keeps its fp32 master partitions (ZeRO-3 lends them to the base optimizer only
    # inside step()); without a ZeRO optimizer, the base optimizer's parameters
    masters = list(
        getattr(opt, "single_partition_of_fp32_groups", None)
        or getattr(opt, "fp32_partitioned_groups_flat", None)
        or [p for g in base.param_groups for p in g["params"]]
    )
    module_ptrs = {p.untyped_storage().data_ptr() for p in params}
    masters = [
        m for m in masters if m.untyped_storage().data_ptr() not in module_ptrs
    ]  # copies, not the module's
    row = {
        "stage": stage,
        "rank": env.rank,
        "params": storage_bytes(params),
        "optimizer_state": storage_bytes(state),
        "master": storage_bytes(masters),
        "n_params": sum(p.numel() for p in engine.module.parameters()),
    }
    if stage == 3:
        row["n_params"] = sum(p.ds_numel for p in engine.module.parameters())
    with open(f"{out}.rank{env.rank}", "w") as f:
        json.dump(row, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker >= 0:
        worker(args.worker, args.precision, args.out)
        return
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (0, 1, 2, 3):
            out = f"{tmp}/stage{stage}"
            cmd = [
                str(Path(sys.executable).with_name("torchrun")),
                "--nproc_per_node=2",
                "--master_port=29611",
                __file__,
                "--worker",
                str(stage),
                "--precision",
                args.precision,
                "--out",
                out,
            ]
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
            rows[stage] = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    base = rows[0][0]
    print(
        f"UNet {base['n_params'] / 1e6:.1f}M parameters, 2 ranks, {args.precision}, torch AdamW; bytes per rank "
        "(rank 0 / rank 1)"
    )
    print(
        f"{'stage':>5} {'params MB':>19} {'Adam state MB':>19} {'fp32 master MB':>19} {'params x':>9} "
        f"{'Adam x':>7} {'Adam+master x':>14}"
    )
    for stage, pair in rows.items():
        mb = {
            k: f"{pair[0][k] / 2**20:8.1f} /{pair[1][k] / 2**20:8.1f}"
            for k in ("params", "optimizer_state", "master")
        }
        ratio = {k: max(r[k] for r in pair) / base[k] for k in ("params", "optimizer_state")}
        both = max(r["optimizer_state"] + r["master"] for r in pair) / (
            base["optimizer_state"] + base["master"]
        )
        print(
            f"{stage:>5} {mb['params']} {mb['optimizer_state']} {mb['master']} {ratio['params']:9.3f} "
            f"{ratio['optimizer_state']:7.3f} {both:14.3f}"
        )
    opt2 = max(r["optimizer_state"] for r in rows[2]) / base["optimizer_state"]
    par3 = max(r["params"] for r in rows[3]) / base["params"]
    print(
        f"goal: stage 2 optimizer state <= 0.55x stage 0: {opt2:.3f} ({'met' if opt2 <= 0.55 else 'NOT met'}); "
        f"stage 3 parameters <= 0.55x: {par3:.3f} ({'met' if par3 <= 0.55 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
