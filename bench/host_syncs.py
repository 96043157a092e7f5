"""Host syncs, collectives and bytes moved per training step, by who asks for them, and the EMA's share.

    .venv/bin/python bench/host_syncs.py [--steps 4] [--nproc 2] [--json out.json]
    # on a GPU machine: --device cuda (counts only reads of CUDA tensors: CPU control flags are free there)

Each configuration (ZeRO 0/2/3 x fp32/bf16, the tiny_cpu experiment) runs in turn in one launch of ``--nproc``
real ranks (torchrun, gloo on CPU), each with an engine of its own. After two warm-up steps, ``--steps`` steps
run inside :class:`trainer.engine.syncs.HostSyncs` with logging, sampling and checkpoints off, so what is
counted is what every step pays. It then measures, the
same way, one update of the EMA as it was (every rank reading the full fp32 weights: a gather per parameter
under bf16 or ZeRO-3) against the sharded EMA's update, and prints the ratio of bytes moved.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(0, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")]


def inside(args) -> None:
    """Inside a rank: every configuration of ``--configs`` in turn (one launch: starting ranks costs more than
    the steps counted), one JSON line each (rank 0)."""
    import torch

    for item in args.configs.split(","):
        zero, precision = item.split(":")
        one(args, int(zero), precision)
        torch.distributed.barrier()


def one(args, zero: int, precision: str) -> None:
    """Train a few steps of one configuration, count, print one JSON line (rank 0)."""
    from tqdm import tqdm

    from trainer.config import compose
    from trainer.engine.ema import full_fp32_params
    from trainer.engine.syncs import HostSyncs
    from trainer.train import Run, prepare, seed_everything

    overrides = ["experiment=tiny_cpu", f"run_dir={args.run_dir / f'run{zero}{precision}'}",
                 f"data.urls={args.shards}", f"deepspeed.zero_stage={zero}", f"precision={precision}", "logger=jsonl",
                 "logger.log_every=1000000", "logger.progress=false", "eval.every=0", "checkpoint.every=1000000",
                 "checkpoint.save_final=false", "data.num_workers=0", f"device={args.device}",
                 f"max_steps={args.steps + 3}"]  # fmt: skip
    cfg = compose("train", overrides)
    seed_everything(cfg.seed)
    run = Run(prepare(cfg))
    run.resume()
    data, bar = iter(run.loader), tqdm(disable=True)
    for _ in range(2):
        run.train_step(data, bar)
    device = "cuda" if args.device == "cuda" else None
    with HostSyncs(device) as step:
        for _ in range(args.steps):
            run.train_step(data, bar)
    module = run.task.ema_module()
    with HostSyncs(device) as old_ema:  # the EMA before issue 16: every rank reads the full fp32 weights
        for _ in full_fp32_params(module, zero, run.precision.mixed):
            pass
    with HostSyncs(device) as new_ema:
        run.ema.update()
    n = args.steps
    ours = {k: v / n for k, v in step.reads.items() if k.startswith("ours:")}
    out = {
        "zero": zero,
        "precision": precision,
        "world": run.env.world_size,
        "reads_per_step_ours": sum(ours.values()),
        "reads_per_step_ours_by_site": ours,
        "reads_per_step_deepspeed": sum(v for k, v in step.reads.items() if k.startswith("deepspeed:")) / n,
        "reads_per_step_deepspeed_by_site": {
            k: v / n for k, v in step.reads.most_common(4) if k.startswith("deepspeed:")
        },
        "reads_per_step_other": step.reads.get("other", 0) / n,
        "reads_per_step_torch_optim": sum(v for k, v in step.reads.items() if k.startswith("torch.optim:"))
        / n,
        "collectives_per_step": sum(step.collectives.values()) / n,
        "collectives_per_step_ours": sum(v for k, v in step.collectives.items() if k.startswith("ours:")) / n,
        "bytes_per_step": sum(step.bytes.values()) / n,
        "ema_update_bytes_old": sum(old_ema.bytes.values()),
        "ema_update_bytes_sharded": sum(new_ema.bytes.values()),
        "ema_update_collectives_old": sum(old_ema.collectives.values()),
        "ema_update_collectives_sharded": sum(new_ema.collectives.values()),
        "model_fp32_bytes": sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)
        if zero < 3
        else sum(p.ds_numel * 4 for p in module.parameters() if p.requires_grad),
    }
    if run.env.is_main:
        print("RESULT " + json.dumps(out), flush=True)
    run.logger.finish()


def launch(args, shards: Path, tmp: Path) -> list[dict]:
    from trainer.engine.distributed import free_port

    cmd = [str(Path(sys.executable).with_name("torchrun")), f"--nproc_per_node={args.nproc}", "--master_port",
           str(free_port()), __file__, "--one", f"--configs={args.configs}", f"--steps={args.steps}",
           f"--shards={shards}", f"--run-dir={tmp}", f"--device={args.device}"]  # fmt: skip
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    rows = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or len(rows) != len(args.configs.split(",")):
        done = [f"{r['zero']}:{r['precision']}" for r in rows]
        raise SystemExit(f"failed after {done}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default=",".join(f"{z}:{p}" for z, p in CONFIGS))
    p.add_argument("--shards", type=Path)
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.one:
        inside(args)
        return
    from data_pipeline.synthetic import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_synthetic(str(shards), num=320, shard_size=40, size=32, seed=0, progress=False)
        rows = launch(args, shards, Path(tmp))
    print(
        f"{'config':<14}{'ours':>6}{'ds':>6}{'coll/step':>10}{'MB/step':>9}{'EMA old MB':>11}{'EMA new MB':>11}{'ratio':>7}"
    )
    for r in rows:
        ratio = r["ema_update_bytes_sharded"] / max(r["ema_update_bytes_old"], 1)
        print(
            f"ZeRO-{r['zero']} {r['precision']:<7}{r['reads_per_step_ours']:>6.1f}{r['reads_per_step_deepspeed']:>6.1f}"
            f"{r['reads_per_step_torch_optim']:>6.1f}"
            f"{r['collectives_per_step']:>10.1f}{r['bytes_per_step'] / 2**20:>9.2f}"
            f"{r['ema_update_bytes_old'] / 2**20:>11.2f}{r['ema_update_bytes_sharded'] / 2**20:>11.2f}{ratio:>7.3f}"
        )
        print(f"    our reads by site: {r['reads_per_step_ours_by_site']}")
        print(f"    DeepSpeed's most frequent: {r['reads_per_step_deepspeed_by_site']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
