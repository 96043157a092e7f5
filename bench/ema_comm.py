"""Bytes the EMA moves between ranks per optimizer step, per fp32 parameter byte: sharded against the old way.

    .venv/bin/torchrun --nproc_per_node=2 bench/ema_comm.py [--width 32] [--steps 2]
    (or simply .venv/bin/python bench/ema_comm.py, which starts the two ranks itself)

Two CPU ranks (gloo), bf16, ZeRO-2 and ZeRO-3, DeepSpeed with AdamW over a UNet of the SD 2.x UNet's
architecture (levels, blocks, attention placement, linear projections) at ``--width`` base channels instead of
320: the same parameter shapes up to the width, 9.1 M parameters at 32 so that it runs in ~30 s on two CPU
ranks (the SD2 UNet itself, 865 M, would need ~20 GB of host memory for two ranks' weights and Adam states). The
ratio does not depend on the width (both ways scale with the parameter count). Every collective inside
an EMA update is recorded (:class:`trainer.engine.syncs.HostSyncs`) with its tensor bytes.

The old way is what the EMA did before issue 16: each step every rank read the full fp32 weights
(``safe_get_full_fp32_param``: an all-reduce of each whole parameter under bf16 and ZeRO-3) and rank 0 kept
the whole EMA. The sharded EMA lerps each rank's own fp32 fragment in place: no collective.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rank_main(args) -> None:
    import deepspeed
    import torch

    from trainer.engine.ema import ShardedEMA, full_fp32_params
    from trainer.engine.syncs import HostSyncs
    from trainer.models.unet import UNetConfig, UNetModel

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = UNetConfig(model_channels=args.width, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
                     attention_resolutions=[4, 2, 1], num_heads=-1, head_dim=args.width // 2, context_dim=256,
                     use_linear_in_transformer=True, sample_size=8)  # fmt: skip
    for stage in (2, 3):
        torch.manual_seed(0)
        model = UNetModel(cfg)
        ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": stage},
              "gradient_clipping": 1e12, "zero_allow_untested_optimizer": True, "steps_per_print": 10**12}  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=opt, model_parameters=model.parameters(), config=ds
        )
        params = sum(
            (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for p in engine.module.parameters()
        )
        ema = ShardedEMA(0.999, rank, world)
        ema.attach(engine.module, initialize=True)
        sharded = old = 0
        for _ in range(args.steps):
            x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
            t = torch.randint(0, 1000, (1,))
            ctx = torch.randn(1, 4, 256, dtype=torch.bfloat16)
            engine.backward(engine(x, t, ctx).float().pow(2).mean())
            engine.step()
            with HostSyncs() as s:
                ema.update()
            sharded += sum(s.bytes.values())
            with HostSyncs() as s:
                for _name, _value in full_fp32_params(engine.module, stage, True):
                    pass
            old += sum(s.bytes.values())
        per = 4 * params * args.steps
        if rank == 0:
            print(f"ZeRO-{stage} bf16, {params / 1e6:.1f} M parameters, {world} ranks: "
                  f"ema bytes per step / fp32 parameter bytes: {sharded / per:.4f} (old way: {old / per:.4f})",
                  flush=True)  # fmt: skip
        del engine, opt, model, ema
        torch.distributed.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return
    from trainer.engine.distributed import free_port

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    cmd = [
        torchrun,
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        __file__,
        f"--width={args.width}",
        f"--steps={args.steps}",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print("\n".join(line for line in out.stdout.splitlines() if "ema bytes" in line))
    if out.returncode != 0:
        raise SystemExit(out.stderr[-4000:])


if __name__ == "__main__":
    main()
