"""Issue 16, EMA: each rank keeps the EMA of the fp32 fragment it owns (ZeRO-2/3, bf16 and fp32), which,
gathered, equals a float64 EMA of the full fp32 weights computed alongside; saved sharded, it loads under
another ZeRO stage and world size and stitches offline to the same tensors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from trainrun import free_port

from trainer.engine.ema import ShardedEMA, full_fp32_params, stitch

pytestmark = pytest.mark.slow
STEPS, DECAY = 6, 0.8


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 33), nn.GELU(), nn.Linear(33, 5), nn.LayerNorm(5))


def engine(stage: int, bf16: bool):
    import deepspeed

    model = tiny()
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": 1e12,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eng, *_ = deepspeed.initialize(
        model=model, optimizer=opt, model_parameters=model.parameters(), config=cfg
    )
    return eng


def _main(rank: int, world: int, port: int, stage: int, bf16: bool, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")  # fmt: skip
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    eng = engine(stage, bf16)
    ema = ShardedEMA(DECAY, rank, world)
    ema.attach(eng.module, initialize=True)
    ref = {n: t.double().clone() for n, t in full_fp32_params(eng.module, stage, bf16)}
    gen = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x = torch.randn(4, 7, generator=gen).to(eng.module[0].weight.dtype)
        eng.backward(eng(x).float().pow(2).mean())
        eng.step()
        ema.update()
        d = min(DECAY, ema.updates / (9 + ema.updates))  # the decay the update before used
        for n, t in full_fp32_params(eng.module, stage, bf16):
            ref[n].lerp_(t.double(), 1 - d)
    full = ema.full()
    assert sorted(full) == sorted(ref)
    err = max((full[n].double() - ref[n]).abs().max().item() for n in ref)
    ema.save(folder)
    torch.distributed.barrier()
    # the same fragments, loaded under the other ZeRO stage (another partition of the same tensors)
    other = engine(3 if stage == 2 else 2, bf16)
    again = ShardedEMA(DECAY, rank, world)
    again.load(folder, other.module)
    reloaded = again.full()
    err_reload = max((reloaded[n] - full[n]).abs().max().item() for n in full)
    if rank == 0:
        torch.save((err, err_reload, again.updates, full), f"{folder}/result.pt")
    torch.distributed.barrier()


@pytest.mark.parametrize("stage,bf16", [(2, False), (2, True), (3, False), (3, True)])
def test_sharded_ema_matches_a_float64_reference_and_reloads_elsewhere(tmp_path, stage, bf16):
    mp.start_processes(
        _main, args=(2, free_port(), stage, bf16, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    err, err_reload, updates, full = torch.load(tmp_path / "result.pt")
    assert err < 1e-6, f"sharded EMA differs from the float64 reference by {err}"
    assert err_reload == 0.0 and updates == STEPS
    assert sorted(p.name for p in (tmp_path / "ema").iterdir()) == [
        "rank_00000.safetensors",
        "rank_00001.safetensors",
    ]
    stitched = stitch(tmp_path)  # offline, any world size: export and ldm-sample use this
    assert all(torch.equal(stitched[n], full[n]) for n in full)
    one = ShardedEMA(DECAY, 0, 1)  # one process with plain fp32 weights (ZeRO-0): every fragment is local
    one.load(tmp_path, tiny())
    assert all(torch.equal(one.full()[n], full[n]) for n in full)
